// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// ERC-165 interface detection (the function OpenZeppelin's IERC165 declares).
interface IERC165 {
    function supportsInterface(bytes4 interfaceId) external view returns (bool);
}

/// An app's boot policy: dstack v0.5.11's IAppAuth (kms/auth-eth/contracts/IAppAuth.sol), same
/// struct (field order and types) and selector, so one ABI works against dstack's contracts and
/// ours. Interface id 0x1e079198. Answers with a reason instead of reverting.
interface IAppAuth is IERC165 {
    /// What the KMS learned about a booting CVM from its verified quote and event log.
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

    function isAppAllowed(AppBootInfo calldata bootInfo)
        external
        view
        returns (bool isAllowed, string memory reason);
}

/// dstack's IAppAuthBasicManagement (interface id 0x8fd37527): what UIs call on an app contract.
interface IAppAuthBasicManagement is IERC165 {
    event ComposeHashAdded(bytes32 composeHash);
    event ComposeHashRemoved(bytes32 composeHash);
    event DeviceAdded(bytes32 deviceId);
    event DeviceRemoved(bytes32 deviceId);

    function addComposeHash(bytes32 composeHash) external;
    function removeComposeHash(bytes32 composeHash) external;
    function addDevice(bytes32 deviceId) external;
    function removeDevice(bytes32 deviceId) external;
}

/// OpenZeppelin 5's Ownable ABI (owner, transferOwnership, renounceOwnership, its errors and
/// event), which dstack's contracts inherit; kept here so nothing is imported.
abstract contract Owned {
    address private _owner;

    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);

    error OwnableUnauthorizedAccount(address account);
    error OwnableInvalidOwner(address owner);

    modifier onlyOwner() {
        if (msg.sender != _owner) revert OwnableUnauthorizedAccount(msg.sender);
        _;
    }

    function owner() public view returns (address) {
        return _owner;
    }

    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert OwnableInvalidOwner(address(0));
        _transferOwnership(newOwner);
    }

    function renounceOwnership() external onlyOwner {
        _transferOwnership(address(0));
    }

    function _transferOwnership(address newOwner) internal {
        emit OwnershipTransferred(_owner, newOwner);
        _owner = newOwner;
    }
}
