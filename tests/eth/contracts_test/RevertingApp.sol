// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// An app contract whose policy view always reverts (a broken or hostile app).
contract RevertingApp {
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

    function isAppAllowed(AppBootInfo calldata) external pure returns (bool, string memory) {
        revert("app policy is broken");
    }
}
