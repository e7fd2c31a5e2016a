"""FuseMoE model code: gates, MoE layer, losses, mTAND encoders and the model (plain PyTorch)."""
