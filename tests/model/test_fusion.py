"""The fusion model: shapes, normalization, and that padding never changes an item's answer."""

from __future__ import annotations

import pytest
import torch

from model.config import FusionConfig
from model.fusion import FusionModel
from model.positions import RelativePositionBias
from model.towers import sincos_grid
from tests.conftest import tiny_config


@pytest.fixture(params=["transformer", "lstm"])
def model(request: pytest.FixtureRequest) -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(tiny_config(request.param)).eval()


def inputs(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=generator)
    tokens = torch.randint(1, 257, (batch, length), generator=generator)
    return images, tokens


def test_forward_shapes_and_unit_embeddings(model: FusionModel) -> None:
    images, tokens = inputs(3, 9)
    with torch.inference_mode():
        out = model(images, tokens)
    assert out["logits"].shape == (3, 22)
    assert out["image_embedding"].shape == (3, 16)
    assert out["text_embedding"].shape == (3, 16)
    for name in ("image_embedding", "text_embedding"):
        torch.testing.assert_close(out[name].norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)


def test_encoders_equal_forward_embeddings(model: FusionModel) -> None:
    images, tokens = inputs(4, 12)
    with torch.inference_mode():
        out = model(images, tokens)
        torch.testing.assert_close(model.encode_image(images), out["image_embedding"], atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), out["text_embedding"], atol=1e-6, rtol=0)


def test_padding_does_not_change_an_item(model: FusionModel) -> None:
    """The batcher pads texts to the longest in the batch: an item must not see its padding."""
    images, tokens = inputs(2, 20)
    short = tokens[:1, :5]
    padded = torch.cat([torch.cat([short, torch.zeros(1, 15, dtype=torch.int64)], dim=1), tokens[1:]])
    with torch.inference_mode():
        alone = model(images[:1], short)
        batched = model(images, padded)
    for name in ("logits", "image_embedding", "text_embedding"):
        torch.testing.assert_close(batched[name][:1], alone[name], atol=1e-5, rtol=1e-5)


def test_all_padding_text_gives_finite_unit_outputs(model: FusionModel) -> None:
    """No text at all (every position masked) still gives a finite, unit-length text embedding, the
    same for every row and the same as encode_text's."""
    images, _ = inputs(2, 1)
    empty = torch.zeros(2, 4, dtype=torch.int64)
    with torch.inference_mode():
        out = model(images, empty)
        alone = model.encode_text(empty)
    assert all(torch.isfinite(value).all() for value in out.values())
    text = out["text_embedding"]
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(text[0], text[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(text, alone, atol=1e-6, rtol=0)


def test_images_are_normalized_inside(model: FusionModel) -> None:
    """uint8 in, no caller-side normalization: the first layer sees (pixel - 127.5) / 64 in each
    colour channel, then the pixel's x and y from -1 (left, top) to 1 (right, bottom)."""
    _, tokens = inputs(1, 6)
    seen: list[torch.Tensor] = []
    hook = model.image_encoder.stem.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    image = torch.empty(1, 3, 32, 32, dtype=torch.uint8)
    image[0, 0], image[0, 1], image[0, 2] = 0, 191, 255
    try:
        with torch.inference_mode():
            model(image, tokens)
    finally:
        hook.remove()
    (x,) = seen
    assert x.shape == (1, 5, 32, 32) and x.dtype == torch.float32
    for channel, value in enumerate((-1.9921875, 0.9921875, 1.9921875)):  # exact in float32
        assert torch.equal(x[0, channel], torch.full((32, 32), value))
    assert x[0, 3, 0, 0] == x[0, 4, 0, 0] == -1.0 and x[0, 3, -1, -1] == x[0, 4, -1, -1] == 1.0
    assert torch.equal(x[0, 3, 0], torch.linspace(-1.0, 1.0, 32)) and torch.equal(
        x[0, 4, :, 0], torch.linspace(-1.0, 1.0, 32)
    )


def test_position_code_is_fixed_unit_scale_and_left_to_right() -> None:
    code = sincos_grid(8, 8, 64)[0]  # (64 cells, 64 channels), row-major over the grid
    assert code.shape == (64, 64)
    torch.testing.assert_close(code.pow(2).mean(dim=1), torch.ones(64), atol=1e-5, rtol=0)  # unit RMS per cell
    assert torch.cdist(code, code).add(torch.eye(64) * 99).min() > 1.0  # every cell tagged apart from the rest
    # The slowest x channel rises strictly from the left column to the right one and is the same
    # down each column: "left or right" is one linear read-out.
    slowest_x = code[:, 0].view(8, 8)
    assert (slowest_x[:, 1:] > slowest_x[:, :-1]).all()
    torch.testing.assert_close(slowest_x, slowest_x[:1].expand(8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_grid(8, 8, 30)


def test_regions_know_where_they_are_on_a_blank_image() -> None:
    """On a uniform image only position tells regions apart (the coordinate channels and the
    position code), and it does so at the scale of the features, where attention can read it."""
    torch.manual_seed(0)
    encoder = FusionModel(tiny_config()).image_encoder.eval()
    with torch.inference_mode():
        regions = encoder(torch.full((1, 3, 32, 32), 200, dtype=torch.uint8))[0]  # (N, C)
    distances = torch.cdist(regions, regions) + torch.eye(len(regions)) * 99
    assert distances.min() > 0.5 * regions.norm(dim=1).mean() / 8  # distinct, not a rounding difference


def test_relative_position_bias_depends_on_the_offset_alone() -> None:
    bias_module = RelativePositionBias((3, 4), heads=2)
    assert bias_module.table.shape == (2, 5 * 7)
    torch.nn.init.normal_(bias_module.table)
    bias = bias_module()
    assert bias is not None and bias.shape == (1, 2, 12, 12)
    cells = [(y, x) for y in range(3) for x in range(4)]  # row-major, like the regions
    by_offset: dict[tuple[int, int], torch.Tensor] = {}
    for i, (yi, xi) in enumerate(cells):
        for j, (yj, xj) in enumerate(cells):
            value = bias[0, :, i, j]
            seen = by_offset.setdefault((yi - yj, xi - xj), value)
            assert torch.equal(seen, value)  # the same offset, the same bias, wherever the pair is
    assert len(by_offset) == 5 * 7  # and every offset has its own entry
    assert len({tuple(v.tolist()) for v in by_offset.values()}) == 5 * 7


def test_relative_position_bias_starts_as_attention_without_it() -> None:
    images, tokens = inputs(2, 7)
    torch.manual_seed(0)
    with_bias = FusionModel(tiny_config()).eval()
    without = FusionModel(FusionConfig(**{**tiny_config().__dict__, "relative_position": False})).eval()
    keys = without.load_state_dict(with_bias.state_dict(), strict=False)
    assert keys.missing_keys == []
    assert keys.unexpected_keys == [f"image_stream.{i}.position_bias.table" for i in range(len(with_bias.image_stream))]
    with torch.inference_mode():
        torch.testing.assert_close(with_bias(images, tokens), without(images, tokens), atol=0, rtol=0)
        for block in with_bias.image_stream:
            assert isinstance(block.position_bias, RelativePositionBias)
            torch.nn.init.normal_(block.position_bias.table)
        assert not torch.allclose(with_bias(images, tokens)["logits"], without(images, tokens)["logits"])


def test_configs_written_before_the_bias_load_without_it() -> None:
    old = {key: value for key, value in FusionConfig().to_dict().items() if key != "relative_position"}
    assert FusionConfig.from_dict(old).relative_position is False
    assert FusionConfig.from_dict(FusionConfig().to_dict()).relative_position is True
