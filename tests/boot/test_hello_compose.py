"""examples/hello as the sandbox reads it: interpolated from the boot's env, a value that holds
a colon (DSTACK_AGENT_URL) stays one `- NAME=value` entry, `$$` reaches the shell as `$`."""

from __future__ import annotations

import json
from pathlib import Path

from pydstack.adapters.sandbox._compose import parse_yaml, services

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello" / "docker-compose.yaml"


def test_hello_example_gets_the_agent_url_and_its_quote_script() -> None:
    compose = json.dumps({"docker_compose_file": EXAMPLE.read_text()}).encode()
    env = {"GREETING": "hi", "DSTACK_APP_ID": "ab" * 20, "DSTACK_INSTANCE_ID": "cd" * 20,
           "DSTACK_AGENT_URL": "http://127.0.0.1:8090"}  # fmt: skip
    [svc] = services(compose, env)
    assert svc.environment == {"GREETING": "hi", "APP_ID": "ab" * 20,
                               "INSTANCE_ID": "cd" * 20,
                               "AGENT_URL": "http://127.0.0.1:8090"}  # fmt: skip
    sh, script = svc.command[:4], svc.command[4:]
    assert sh[:2] == ("sh", "-c") and sh[3] == "sh"
    assert '"$@" > /www/cgi-bin/quote' in sh[2] and sh[2].endswith("exec httpd -f -p 8080 -h /www")
    assert script[0] == "#!/bin/sh"
    assert (
        'wget -q -O - --header "Content-Type: application/json" --post-data '
        '"{\\"report_data\\":\\"$rd\\"}" "$AGENT_URL/GetQuote"'
    ) in "\n".join(script)
    assert "$$" not in "\n".join(svc.command)


def test_list_item_with_a_colon_but_no_key_indicator_is_a_scalar() -> None:
    doc = parse_yaml("env:\n  - URL=http://x:1\n  - k: v\n  - 'a: b'\n")
    assert doc == {"env": ["URL=http://x:1", {"k": "v"}, "a: b"]}
