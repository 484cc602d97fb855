"""TransferSegLib: transfer learning for 3D medical image segmentation (torch + MONAI).

The library behind the TransferSeg 3D Slicer module; usable on its own and through the
``transferseg`` command line. No Qt import anywhere in it.
"""

__version__ = "0.1.0"
