"""An MCP client (PyPI `mcp`, Streamable HTTP) for Tollgate's end-to-end tests.

Usage: client.py URL TOKEN STEP...

STEP is `list` or `call:TOOL:JSON_ARGUMENTS`. Each step prints one JSON line:
{"step": ..., "ok": true, "tools": [...]} / {"ok": true, "text": ...} or
{"ok": false, "error": "..."}. TOKEN "-" sends no credential.
"""

import asyncio
import json
import sys

import httpx2

from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main() -> None:
    url, token, steps = sys.argv[1], sys.argv[2], sys.argv[3:]
    headers = {} if token == "-" else {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=20) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, raise_exceptions=True) as client:
            for step in steps:
                out = {"step": step}
                try:
                    if step == "list":
                        result = await client.list_tools()
                        out.update(ok=True, tools=sorted(t.name for t in result.tools))
                    else:
                        _, tool, args = step.split(":", 2)
                        result = await client.call_tool(tool, json.loads(args))
                        text = " ".join(getattr(c, "text", "") for c in result.content)
                        out.update(ok=not result.is_error, text=text)
                except Exception as e:  # noqa: BLE001 - the test reads the error text
                    out.update(ok=False, error=f"{type(e).__name__}: {e}")
                print(json.dumps(out), flush=True)


asyncio.run(main())
