"""What tests, scripts and benchmarks build and measure with; nothing the CLI or the Python API runs
imports it (tests/test_package.py checks).

- `models`: tiny deterministic random-weight GGUF pairs (qwen3moe, qwen2moe, Mixtral-style llama)
- `demo_eval`: held-out perplexity, greedy agreement, acceptance and routing statistics of the demo
  pair (docs/DEMO.md); the demo pair itself is built by `spac_gguf.demo`, which `run` and `serve`
  use when no model is given
- `synthetic`: synthetic routing traces (Zipf popularity that drifts, temporal locality)
- `locality_stats`: what locality a routing trace has (`measure`), the oracle `locality`'s presets
  are held to
"""
