"""Write golden files for event types that have none yet. Never overwrites: a golden file is a
promise that bytes written by this version decode forever.

    python -m tests.golden.make_golden
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from pydstack.core.events import EVENT_TYPES, Signer, encode_body, seal, tag_of
from tests.golden.samples import sample_event

HERE = Path(__file__).parent / "v1"
SIGNER = Signer.from_private_bytes("golden", bytes(32))


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for event_type in EVENT_TYPES:
        tag = tag_of(event_type)
        body_path = HERE / f"{tag}.msgpack"
        if body_path.exists():
            continue
        event = sample_event(event_type)
        body_path.write_bytes(encode_body(event))
        (HERE / f"{tag}.json").write_text(json.dumps(msgspec.to_builtins(event), indent=1) + "\n")
        wire = seal(
            SIGNER,
            event,
            subject="dstack.vm.golden",
            event_id=f"golden-{tag}",
            time_ns=1_700_000_000_000_000_000,
            correlation="golden",
            prev=bytes(32),
        )
        (HERE / f"{tag}.message").write_bytes(wire)
        print(f"wrote {tag}")


if __name__ == "__main__":
    main()
