"""Teacher sampling: shapes and determinism."""

import torch

from sparseforge_compile.distill import sample_from_teacher
from sparseforge_compile.models import load_model


def test_samples_continue_the_prompts_and_repeat_for_a_seed():
    teacher = load_model("tiny-llama").model.eval()
    prompts = torch.randint(0, 256, (6, 4), generator=torch.Generator().manual_seed(0))
    a = sample_from_teacher(teacher, prompts, 20, batch_size=4, seed=3)
    b = sample_from_teacher(teacher, prompts, 20, batch_size=4, seed=3)
    assert a.shape == (6, 20) and torch.equal(a[:, :4], prompts) and torch.equal(a, b)
    assert not torch.equal(a, sample_from_teacher(teacher, prompts, 20, batch_size=4, seed=4))
