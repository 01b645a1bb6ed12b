"""`quasar serve` / `python -m quasar.serve`: an OpenAI-compatible HTTP server on the batched
engine (FastAPI + uvicorn, the `serve` extra).

    python -m quasar.serve --config configs/quasar-smollm2.yaml --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 16}'

Modules: cli (flags, config, uvicorn), app (routes, errors), protocol (pydantic bodies),
async_engine (the engine thread and per-request queues), metrics (Prometheus).
"""
