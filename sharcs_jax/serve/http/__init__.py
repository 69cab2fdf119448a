"""The HTTP server: TEI's routes and errors, the batcher across requests, the Starlette app."""
