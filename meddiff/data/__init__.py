"""Medical data: the phantom generator, dataset readers and datasets."""

from meddiff.data.datasets import ArrayDataset, ImageChannels, PackedMasks
from meddiff.data.medmnist import read_medmnist_npz
from meddiff.data.phantoms import DEFAULT_ACQUISITION, Acquisition, PhantomDataset, make_phantoms

__all__ = ["ArrayDataset", "ImageChannels", "PackedMasks", "read_medmnist_npz", "Acquisition", "DEFAULT_ACQUISITION", "PhantomDataset", "make_phantoms"]
