"""An OpenAI-compatible API simulator with faithful rate limits and faults on demand.

It is the upstream for tests, the demo and benchmarks: nobody working on trio-mapper needs an API key.
See docs/simulator.md.
"""

from .app import SimulatorApp
from .cli import add_simulate_arguments, config_from_args, run_simulate
from .config import SimulatorConfig
from .server import open_simulator, serve_app, serve_simulator

__all__ = [
    "SimulatorApp",
    "SimulatorConfig",
    "add_simulate_arguments",
    "config_from_args",
    "open_simulator",
    "run_simulate",
    "serve_app",
    "serve_simulator",
]
