"""The summary token (model.summary_token): what the GBM sees, as one more token of the model."""

import pytest
import torch
from batches import STATIC, Spec, collate, drop_modality, make_samples

from fusemoe.nn.model import FuseMoE, FuseMoEConfig
from fusemoe.nn.summary import STATS, SummaryEncoder, variable_summaries

torch.set_num_threads(1)

SMALL = dict(
    d_model=16, n_heads=2, num_ref_points=4, num_experts=4, top_k=2, expert_hidden=24, dropout=0.0
)


def model(**overrides) -> FuseMoE:
    torch.manual_seed(0)
    return FuseMoE(FuseMoEConfig(**{**SMALL, "summary_token": True, **overrides}), Spec())


def test_variable_summaries_are_count_first_last_min_max_mean_and_flag():
    # Variable 0 seen at 3 times (out of time order in the padded rows), variable 1 never.
    times = torch.tensor([[5.0, 1.0, 3.0, 0.0]])
    values = torch.tensor([[[4.0, 0.0], [-2.0, 0.0], [1.0, 0.0], [99.0, 0.0]]])
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    stats = variable_summaries(values, mask, times)
    assert stats.shape == (1, 2, len(STATS))
    expected = [torch.log1p(torch.tensor(3.0)).item(), -2.0, 4.0, -2.0, 4.0, 1.0, 1.0]
    torch.testing.assert_close(stats[0, 0], torch.tensor(expected))
    assert torch.equal(stats[0, 1], torch.zeros(len(STATS)))


def test_extreme_values_are_clipped_in_the_summaries():
    times, mask = torch.tensor([[1.0]]), torch.ones(1, 1, 1)
    stats = variable_summaries(torch.tensor([[[1e6]]]), mask, times)
    assert stats[0, 0, STATS.index("max")] == 10.0


def test_summary_token_adds_one_token_and_a_router():
    plain = FuseMoE(FuseMoEConfig(**SMALL), Spec())
    m = model()
    assert m.modality_tokens == plain.modality_tokens + [1]
    batch = collate(make_samples(Spec(), 3))
    assert m.encode(batch).shape == (3, sum(m.modality_tokens), 16)


def test_summary_token_comes_after_the_embedding_and_static_tokens():
    # Series, then embedding modalities, then static, then the summary token: each has its own
    # modality embedding (the static one is 1 token, not an embedding modality's num_ref_points).
    spec = Spec(embeddings={"note": 6})
    m = FuseMoE(FuseMoEConfig(**{**SMALL, "summary_token": True}), spec).eval()
    assert m.modality_tokens == [4, 4, 4, 1, 1]
    with torch.no_grad():
        tokens = m.encode(collate(make_samples(spec, 3)))
    assert tokens.shape == (3, sum(m.modality_tokens), 16)


def test_a_sample_scores_the_same_alone_and_in_any_batch_with_the_summary_token():
    m = model().eval()
    samples = make_samples(Spec(), 5, seed=2)
    with torch.no_grad():
        together = m(collate(samples)).logits["ihm"]
        padded = m(collate(samples[::-1], extra_pad=6)).logits["ihm"].flip(0)
        for i, s in enumerate(samples):
            alone = m(collate([s])).logits["ihm"]
            torch.testing.assert_close(alone, together[i : i + 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, together, atol=1e-5, rtol=0)


@pytest.mark.parametrize("modality", ["vitals", "labs"])
def test_a_modality_flagged_missing_gives_the_same_summary_as_no_events(modality):
    enc = SummaryEncoder(Spec().series, 16)
    sample = make_samples(Spec(), 1, seed=3)[0]
    flagged = collate([sample])
    flagged["present"][modality] = torch.zeros(1, dtype=torch.bool)
    dropped = collate([drop_modality(sample, modality)])
    with torch.no_grad():
        a = enc(flagged["series"], flagged["present"], 1)
        b = enc(dropped["series"], dropped["present"], 1)
    torch.testing.assert_close(a, b)


def test_without_any_series_the_summary_token_is_its_missing_embedding():
    m = model().eval()
    batch = collate([drop_modality(drop_modality(make_samples(Spec(), 1)[0], "vitals"), "labs")])
    with torch.no_grad():
        tokens = m.encode(batch)[:, -1]
    emb = m.modality_embed[-1]
    expected = emb.missing[0] + emb.type_embed + emb.presence.weight[0]
    torch.testing.assert_close(tokens[0], expected)
    assert STATIC in batch["present"]


def test_summary_token_is_off_by_default_and_settable_from_params_yaml():
    from pipelines.config import ModelConfig

    assert not FuseMoEConfig().summary_token
    assert ModelConfig(summary_token=True).summary_token
    assert FuseMoEConfig.from_params({"summary_token": True}).summary_token
