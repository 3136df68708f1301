import pytest
import torch

from tests.conftest import tiny_unet


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 2])
def test_output_shapes(spatial_dims, channels, num_classes):
    model = tiny_unet(spatial_dims=spatial_dims, in_channels=channels, out_channels=channels, num_classes=num_classes)
    size = 16 if spatial_dims == 2 else 8
    x = torch.randn(2, channels, *([size] * spatial_dims))
    y = torch.tensor([0, 1]) if num_classes else None
    out = model(x, torch.tensor([3, 999]), y)
    assert out.shape == x.shape


def test_different_in_and_out_channels_and_three_levels():
    model = tiny_unet(in_channels=2, out_channels=5, channel_mult=(1, 2, 2), attention_levels=(1, 2), resblock_updown=False)
    assert model(torch.randn(2, 2, 16, 16), torch.tensor([1, 2])).shape == (2, 5, 16, 16)


def test_empty_batch_passes_through():
    model = tiny_unet(num_classes=2)
    out = model(torch.randn(0, 1, 16, 16), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 1, 16, 16)


def test_zero_initialised_output_layers_give_zero_output():
    model = tiny_unet()
    assert torch.count_nonzero(model(torch.randn(2, 1, 16, 16), torch.tensor([1, 500]))) == 0
    assert all(torch.count_nonzero(p) == 0 for p in model.conv_out.parameters())


def test_class_and_time_conditioning_change_the_output():
    torch.manual_seed(0)
    model = tiny_unet(num_classes=2)
    for p in model.parameters():  # undo zero-init so outputs depend on inputs
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 16, 16)
    a = model(x, torch.tensor([10]), torch.tensor([0]))
    assert not torch.allclose(a, model(x, torch.tensor([10]), torch.tensor([1])))
    assert not torch.allclose(a, model(x, torch.tensor([900]), torch.tensor([0])))
    # y=None means the null label
    assert torch.allclose(model(x, torch.tensor([10])), model(x, torch.tensor([10]), torch.tensor([2])))


def test_labels_to_unconditional_model_is_an_error():
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet()(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        tiny_unet(spatial_dims=1)
    with pytest.raises(ValueError, match="attention_levels"):
        tiny_unet(attention_levels=(5,))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_conditioning_channels_are_concatenated_to_x_t(spatial_dims):
    torch.manual_seed(0)
    model = tiny_unet(spatial_dims=spatial_dims, cond_channels=3, num_classes=2)
    for p in model.parameters():  # undo zero-init so outputs depend on inputs
        torch.nn.init.normal_(p, std=0.05)
    size = 16 if spatial_dims == 2 else 8
    x, cond = torch.randn(2, 1, *[size] * spatial_dims), torch.randn(2, 3, *[size] * spatial_dims).sign()
    t, y = torch.tensor([3, 500]), torch.tensor([0, 1])
    assert model.conv_in.weight.shape[1] == 4  # x_t's channel + 3 condition channels
    out = model(x, t, y, cond=cond)
    assert out.shape == x.shape
    torch.testing.assert_close(model(torch.cat([x, cond], 1), t, y), out)  # packed input: the same function
    torch.testing.assert_close(model(x, t, y), model(x, t, y, cond=torch.zeros_like(cond)))  # None = null condition
    assert not torch.allclose(out, model(x, t, y))  # the mask changes the prediction


def test_conditioning_shape_errors_are_clear():
    model = tiny_unet(cond_channels=2)
    with pytest.raises(ValueError, match="does not fit a UNet with 2 conditioning"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]), cond=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="x has 2 channels"):
        model(torch.randn(1, 2, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="0 conditioning"):
        tiny_unet()(torch.randn(1, 1, 16, 16), torch.tensor([1]), cond=torch.randn(1, 1, 16, 16))
