// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import "./IAppAuth.sol";
import "./AppAuth.sol";

/// A KMS cluster's boot policy.
///
/// Apps: an app id maps to the AppAuth-like contract holding that app's own policy. The KMS
/// owner decides which OS images any app may boot on; the app's contract decides the rest.
/// KMS replicas: the owner lists the aggregated measurements and device ids a KMS may run with.
/// Every change emits an event. Views answer (allowed, reason) and never revert.
contract KmsAuth {
    address public owner;
    string public gatewayAppId;
    mapping(address => address) public appContracts;
    mapping(bytes32 => bool) public allowedOsImages;
    mapping(bytes32 => bool) public kmsAllowedAggregatedMrs;
    mapping(bytes32 => bool) public kmsAllowedDeviceIds;

    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);
    event AppRegistered(address indexed appId, address appContract);
    event AppDeregistered(address indexed appId);
    event AppDeployed(address indexed appId, address indexed deployer, address appOwner);
    event OsImageHashAdded(bytes32 osImageHash);
    event OsImageHashRemoved(bytes32 osImageHash);
    event KmsAggregatedMrAdded(bytes32 mrAggregated);
    event KmsAggregatedMrRemoved(bytes32 mrAggregated);
    event KmsDeviceAdded(bytes32 deviceId);
    event KmsDeviceRemoved(bytes32 deviceId);
    event GatewayAppIdSet(string gatewayAppId);

    error NotOwner(address caller);
    error ZeroAddress();
    error AlreadyRegistered(address appId);

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    constructor(address initialOwner) {
        if (initialOwner == address(0)) revert ZeroAddress();
        owner = initialOwner;
        emit OwnershipTransferred(address(0), initialOwner);
    }

    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert ZeroAddress();
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    function setGatewayAppId(string calldata appId) external onlyOwner {
        gatewayAppId = appId;
        emit GatewayAppIdSet(appId);
    }

    /// Register an app id whose policy lives in `appContract` (an IAppAuth).
    function registerApp(address appId, address appContract) external onlyOwner {
        _register(appId, appContract);
    }

    function deregisterApp(address appId) external onlyOwner {
        delete appContracts[appId];
        emit AppDeregistered(appId);
    }

    /// Factory: anyone may create an app. Its id is the new AppAuth's address, so it cannot
    /// take over an existing id, and it still boots only on OS images the KMS owner allows.
    function deployApp(address appOwner, bool allowAny, bytes32 composeHash, bytes32 deviceId)
        external
        returns (address appId)
    {
        appId = address(new AppAuth(appOwner, allowAny, composeHash, deviceId));
        _register(appId, appId);
        emit AppDeployed(appId, msg.sender, appOwner);
    }

    function _register(address appId, address appContract) internal {
        if (appId == address(0) || appContract == address(0)) revert ZeroAddress();
        if (appContracts[appId] != address(0)) revert AlreadyRegistered(appId);
        appContracts[appId] = appContract;
        emit AppRegistered(appId, appContract);
    }

    function addOsImageHash(bytes32 osImageHash) external onlyOwner {
        allowedOsImages[osImageHash] = true;
        emit OsImageHashAdded(osImageHash);
    }

    function removeOsImageHash(bytes32 osImageHash) external onlyOwner {
        allowedOsImages[osImageHash] = false;
        emit OsImageHashRemoved(osImageHash);
    }

    function addKmsAggregatedMr(bytes32 mrAggregated) external onlyOwner {
        kmsAllowedAggregatedMrs[mrAggregated] = true;
        emit KmsAggregatedMrAdded(mrAggregated);
    }

    function removeKmsAggregatedMr(bytes32 mrAggregated) external onlyOwner {
        kmsAllowedAggregatedMrs[mrAggregated] = false;
        emit KmsAggregatedMrRemoved(mrAggregated);
    }

    function addKmsDevice(bytes32 deviceId) external onlyOwner {
        kmsAllowedDeviceIds[deviceId] = true;
        emit KmsDeviceAdded(deviceId);
    }

    function removeKmsDevice(bytes32 deviceId) external onlyOwner {
        kmsAllowedDeviceIds[deviceId] = false;
        emit KmsDeviceRemoved(deviceId);
    }

    function isAppAllowed(AppBootInfo calldata bootInfo)
        external
        view
        returns (bool isAllowed, string memory reason)
    {
        address appContract = appContracts[bootInfo.appId];
        if (appContract == address(0)) {
            return (false, "App not registered");
        }
        if (!allowedOsImages[bootInfo.osImageHash]) {
            return (false, "OS image is not allowed");
        }
        if (appContract.code.length == 0) {
            return (false, "App contract not deployed");
        }
        // A broken or hostile app contract must not make the KMS's answer revert.
        try IAppAuth(appContract).isAppAllowed(bootInfo) returns (bool ok, string memory why) {
            return (ok, why);
        } catch {
            return (false, "App contract call failed");
        }
    }

    function isKmsAllowed(AppBootInfo calldata bootInfo)
        external
        view
        returns (bool isAllowed, string memory reason)
    {
        if (keccak256(bytes(bootInfo.tcbStatus)) != keccak256("UpToDate")) {
            return (false, "TCB status is not up to date");
        }
        if (!allowedOsImages[bootInfo.osImageHash]) {
            return (false, "OS image is not allowed");
        }
        if (!kmsAllowedAggregatedMrs[bootInfo.mrAggregated]) {
            return (false, "Aggregated MR not allowed");
        }
        if (!kmsAllowedDeviceIds[bootInfo.deviceId]) {
            return (false, "KMS is not allowed to boot on this device");
        }
        return (true, "");
    }
}
