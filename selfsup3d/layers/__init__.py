"""Building blocks shared by the heads: transformer blocks and attention, positional codes, convolutional
up-sampling and the 3D U-Net. Import from the submodules."""
