// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import "./IAppAuth.sol";

/// One app's boot policy, with dstack v0.5.11's DstackApp ABI: its owner lists the compose
/// hashes and device ids allowed to boot the app (`allowAnyDevice` skips the device check,
/// `requireTcbUpToDate` refuses an out-of-date TCB). The app id is this contract's address.
///
/// Differs from dstack's: no UUPS proxy. DstackKms's factory makes each app an EIP-1167 clone of
/// a fixed implementation and initializes it in the same transaction, so an app's code never
/// changes (`disableUpgrades` is kept for the ABI and only records the wish).
contract DstackApp is Owned, IAppAuth, IAppAuthBasicManagement {
    mapping(bytes32 => bool) public allowedComposeHashes;
    bool private _upgradesDisabled;
    bool public allowAnyDevice;
    mapping(bytes32 => bool) public allowedDeviceIds;
    bool public requireTcbUpToDate;
    bool private _initialized;

    event UpgradesDisabled();
    event AllowAnyDeviceSet(bool allowAny);
    event RequireTcbUpToDateSet(bool requireUpToDate);
    event Initialized(uint64 version);

    error InvalidInitialization();

    /// The implementation itself can never be initialized (only its clones are).
    constructor() {
        _initialized = true;
    }

    function initialize(
        address initialOwner,
        bool _disableUpgrades,
        bool _allowAnyDevice,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) public {
        _init(initialOwner, _disableUpgrades, false, _allowAnyDevice, initialDeviceId, initialComposeHash);
    }

    function initialize(
        address initialOwner,
        bool _disableUpgrades,
        bool _requireTcbUpToDate,
        bool _allowAnyDevice,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) public {
        _init(
            initialOwner, _disableUpgrades, _requireTcbUpToDate, _allowAnyDevice, initialDeviceId, initialComposeHash
        );
    }

    function _init(
        address initialOwner,
        bool _disableUpgrades,
        bool _requireTcbUpToDate,
        bool _allowAnyDevice,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) internal {
        if (_initialized) revert InvalidInitialization();
        _initialized = true;
        require(initialOwner != address(0), "invalid owner address");
        _upgradesDisabled = _disableUpgrades;
        requireTcbUpToDate = _requireTcbUpToDate;
        allowAnyDevice = _allowAnyDevice;
        if (initialDeviceId != bytes32(0)) {
            allowedDeviceIds[initialDeviceId] = true;
            emit DeviceAdded(initialDeviceId);
        }
        if (initialComposeHash != bytes32(0)) {
            allowedComposeHashes[initialComposeHash] = true;
            emit ComposeHashAdded(initialComposeHash);
        }
        _transferOwnership(initialOwner);
        emit Initialized(1);
    }

    function version() public pure returns (uint256) {
        return 2;
    }

    function supportsInterface(bytes4 interfaceId) public pure returns (bool) {
        return interfaceId == 0x1e079198 // IAppAuth
            || interfaceId == 0x8fd37527 // IAppAuthBasicManagement
            || interfaceId == 0x01ffc9a7; // IERC165
    }

    function addComposeHash(bytes32 composeHash) external onlyOwner {
        allowedComposeHashes[composeHash] = true;
        emit ComposeHashAdded(composeHash);
    }

    function removeComposeHash(bytes32 composeHash) external onlyOwner {
        allowedComposeHashes[composeHash] = false;
        emit ComposeHashRemoved(composeHash);
    }

    function setAllowAnyDevice(bool _allowAnyDevice) external onlyOwner {
        allowAnyDevice = _allowAnyDevice;
        emit AllowAnyDeviceSet(_allowAnyDevice);
    }

    function setRequireTcbUpToDate(bool _requireUpToDate) external onlyOwner {
        requireTcbUpToDate = _requireUpToDate;
        emit RequireTcbUpToDateSet(_requireUpToDate);
    }

    function addDevice(bytes32 deviceId) external onlyOwner {
        allowedDeviceIds[deviceId] = true;
        emit DeviceAdded(deviceId);
    }

    function removeDevice(bytes32 deviceId) external onlyOwner {
        allowedDeviceIds[deviceId] = false;
        emit DeviceRemoved(deviceId);
    }

    function disableUpgrades() external onlyOwner {
        _upgradesDisabled = true;
        emit UpgradesDisabled();
    }

    function isAppAllowed(AppBootInfo calldata bootInfo)
        external
        view
        override
        returns (bool isAllowed, string memory reason)
    {
        if (requireTcbUpToDate && keccak256(bytes(bootInfo.tcbStatus)) != keccak256("UpToDate")) {
            return (false, "TCB status is not up to date");
        }
        if (!allowedComposeHashes[bootInfo.composeHash]) {
            return (false, "Compose hash not allowed");
        }
        if (!allowAnyDevice && !allowedDeviceIds[bootInfo.deviceId]) {
            return (false, "Device not allowed");
        }
        return (true, "");
    }
}
