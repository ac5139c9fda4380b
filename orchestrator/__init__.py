"""The LangGraph runtime (state, nodes, routing, durable runs, threads, events), the HTTP API and the CLI."""
