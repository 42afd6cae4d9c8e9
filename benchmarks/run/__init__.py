"""Run every guard benchmark in one go; write a Markdown report and a JSON file.

    .venv/bin/python -m benchmarks.run [--quick] [--out DIR]

Starts (all on loopback) the fake upstream, redis, five guards (pass-through, default
policy and default + limits with 1 worker and the memory store; default + limits with Redis;
2 workers with Redis), LiteLLM (if ``.bench-venv`` exists; see
``scripts/install-bench-tools.sh``), then measures: saturation with wrk, fixed-rate latency
with hey, paired latency at concurrency 1 and stream timing with the Python client, a py-spy
profile, the memory/overhead curve against the number of clients, and, when the bundled
teacher's weights exist, real vLLM. See BENCHMARKS.md.

The modules: :mod:`.options` (phases, command line, CPU layout), :mod:`.bench` (processes,
services, measuring), one module per kind of phase (:mod:`.throughput`, :mod:`.latency`,
:mod:`.profiling`, :mod:`.scale`, :mod:`.e2e_vllm`), :mod:`.targets`, :mod:`.machine`, and
:mod:`.cli`, which runs them.
"""
