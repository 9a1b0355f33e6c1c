"""A small MCP server (PyPI `mcp`, Streamable HTTP) for Tollgate's end-to-end tests.

Usage: bank_server.py PORT SEEN_FILE

Every request's Authorization / x-api-key header (or "-" when absent) and its
path are appended to SEEN_FILE, so a test can check that a client's token
never reached the server.
"""

import sys
from typing import Annotated

import uvicorn
from pydantic import Field

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

port = int(sys.argv[1])
seen_file = sys.argv[2]

server = MCPServer("bank")


@server.tool()
def get_balance(account: str) -> str:
    """Balance of an account."""
    return f"balance of {account}: 100"


@server.tool()
def transfer(
    amount: int,
    to: Annotated[str, Field(json_schema_extra={"x-mcp-header": "To"})],
) -> str:
    """Move money."""
    return f"sent {amount} to {to}"


@server.tool()
def delete_account(account: str) -> str:
    """Close an account."""
    return f"deleted {account}"


# The tests reach it through Envoy under other Host names (DNS rebinding
# protection is for browsers; Envoy is the only client here).
app = server.streamable_http_app(
    streamable_http_path="/mcp",
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)


class Recorder:
    """ASGI middleware writing the credential headers each request carried."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"-").decode()
            key = headers.get(b"x-api-key", b"-").decode()
            with open(seen_file, "a") as f:
                f.write(f"{scope['method']} {scope['path']} authorization={auth} x-api-key={key}\n")
        await self.inner(scope, receive, send)


uvicorn.run(Recorder(app), host="127.0.0.1", port=port, log_level="warning")
