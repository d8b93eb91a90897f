"""`voxpipe web`: the browser front-end. `gateway` is the aiohttp process that serves the page in
`static/` and bridges one WebSocket per browser tab to the bus (docs/protocol.md §8)."""
