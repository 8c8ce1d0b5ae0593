import torch

from otca.rollout import seeded_generator, select_train_steps


def test_seeded_generator_depends_only_on_key():
    a = torch.randn(5, generator=seeded_generator(0, 3, 1, 7))
    b = torch.randn(5, generator=seeded_generator(0, 3, 1, 7))
    c = torch.randn(5, generator=seeded_generator(0, 3, 1, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_select_train_steps_prefix_and_drop_last():
    g = torch.Generator().manual_seed(0)
    m = select_train_steps(3, 5, fraction=1.0, mode="prefix", drop_last=True, generator=g)
    assert m.tolist() == [[True, True, True, True, False]] * 3
    m = select_train_steps(2, 5, fraction=0.5, mode="prefix", drop_last=False, generator=g)
    assert m.tolist() == [[True, True, False, False, False]] * 2


def test_select_train_steps_random_counts_and_variety():
    g = torch.Generator().manual_seed(0)
    m = select_train_steps(64, 16, fraction=0.6, mode="random", drop_last=True, generator=g)
    assert (m.sum(1) == 9).all()  # floor(0.6 * 15)
    assert not m[:, 15].any()  # the last transition is never trained
    assert len({tuple(r.tolist()) for r in m}) > 1  # a different subset per sample


def test_zero_variance_groups_counts_groups_constant_in_every_objective():
    from otca.diagnostics import zero_variance_groups

    rewards = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 3.0], [5.0, 5.0], [5.0, 5.0]])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2])  # group 0 and 2 constant; group 1 varies in column 1
    assert zero_variance_groups(rewards, group_ids) == 2
