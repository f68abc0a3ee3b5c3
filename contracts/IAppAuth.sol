// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// What the KMS learned about a booting CVM from its verified quote and event log.
/// The field order and types are dstack's AppBootInfo, so the same ABI tuple works against
/// dstack's own contracts and ours.
struct AppBootInfo {
    address appId;
    bytes32 composeHash;
    address instanceId;
    bytes32 deviceId;
    bytes32 mrAggregated;
    bytes32 mrSystem;
    bytes32 osImageHash;
    string tcbStatus;
    string[] advisoryIds;
}

/// An app's boot policy. Answers with a reason instead of reverting, so the KMS can log why.
interface IAppAuth {
    function isAppAllowed(AppBootInfo calldata bootInfo)
        external
        view
        returns (bool isAllowed, string memory reason);
}
