"""FuseMoE model building blocks: gates, experts, MoE layer, encoders, model."""
