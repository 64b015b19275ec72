"""edge-tdmpc: TD-MPC2 agents distilled, quantized, compiled and benchmarked for edge robots."""
from edge_tdmpc.checkpoint import CheckpointError, load_model, save_model
from edge_tdmpc.config import ModelConfig, make_config
from edge_tdmpc.model import WorldModel

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ModelConfig", "WorldModel", "load_model", "make_config", "save_model"]
