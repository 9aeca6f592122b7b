"""The OpenAI-compatible server: three processes joined by ZMQ, started by `kestrel serve`.

    launcher.py          supervisor: spawns and watches the three processes, owns shutdown
    api_server.py        API process: FastAPI app, routes, auth, health (never imports torch)
    openai_serving.py    API process: /v1/chat/completions and /v1/completions
    generate.py          API process: the native /generate endpoint
    serving.py           API process: what the endpoints share (checks, submission, SSE, disconnects)
    protocol.py          API process: pydantic request and response models
    errors.py            API process: OpenAI-style error bodies
    client.py            API process: tracks in-flight requests, talks ZMQ to the other processes
    engine_proc.py       engine process: drains requests, steps the engine, emits token batches
    detokenizer_proc.py  detokenizer process: token ids -> text deltas, stop strings
    child.py             what every child process does first (logging, signals, parent death)
    config.py            ServerConfig and IpcAddresses handed to the processes
    commands.py          `kestrel serve` and `kestrel client`

Messages between the processes live in `kestrel/messages.py`.
"""
