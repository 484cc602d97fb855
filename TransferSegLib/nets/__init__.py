"""Our own implementations of published network topologies, one file per family.

Each module defines ``ARCHITECTURES``: {name: dict(network_class=..., resolve=..., divisor=...,
encoder=..., decoder=..., head=..., extra_arguments=(...))}, the fields of the architecture
registry in :mod:`TransferSegLib.networks`, which picks every module here up by itself. The
classes take ``spatial_dims=3, in_channels, out_channels`` like MONAI's networks and depend on
torch (and MONAI) only, so weights from the published files can be loaded into them by the
importers in :mod:`TransferSegLib.importers`.
"""
