"""The OpenAI-compatible server: three processes joined by ZMQ, started by `kestrel serve`.

    launcher.py          supervisor: spawns and watches the three processes, restarts the engine,
                         drains on SIGTERM, owns the exit status
    api_server.py        API process: FastAPI app, routes, auth, health, drain (never imports torch)
    openai_serving.py    API process: /v1/chat/completions and /v1/completions
    generate.py          API process: the native /generate endpoint
    serving.py           API process: what the endpoints share (state and health, checks, tokenizing
                         off the event loop, submission and queue limit, SSE, disconnects)
    middleware.py        API process: body size limit (413), admission while draining, call counting
    observability.py     API process: /metrics, /v1/stats, /dashboard (dashboard.html)
    request_stats.py     API process: request latencies and recent first-token percentiles
    openapi.py           API process: what /openapi.json says of each route (bodies, errors)
    protocol.py          API process: pydantic request and response models
    errors.py            API process: OpenAI-style error bodies
    client.py            API process: tracks in-flight requests, talks ZMQ to the other processes
    engine_proc.py       engine process: drains requests, steps the engine, emits token batches
    engine_stats.py      engine process: metrics, heartbeats (per-worker figures), the stats log line
    detokenizer_proc.py  detokenizer process: token ids -> text deltas, stop strings
    metrics.py           Prometheus metric names of both processes, multi-process collection
    child.py             what every child process does first (logging, signals, parent death, sockets)
    config.py            ServerConfig and IpcAddresses handed to the processes
    commands.py          `kestrel serve` and `kestrel client`

Messages between the processes live in `kestrel/messages.py`.
"""
