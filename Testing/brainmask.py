"""The reference brain mask of the ICBM152 sample, as nilearn defines it.

nilearn's ``load_mni152_brain_mask`` (nilearn 0.14.1, ``datasets/struct.py``) divides the
skull-stripped ICBM152 2009a T1 template by its maximum and keeps the voxels above 0.2 (its
default threshold). The ``icbm152`` sample's image is that template file, so the same
definition applied to it gives the same mask, on the sample's grid.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

THRESHOLD = 0.2  # nilearn's default, as a fraction of the template's maximum


def icbm152_brain_mask(sample) -> sitk.Image:
    """A uint8 label map (1 = brain) on the grid of ``sample.image`` (an ``icbm152`` sample)."""
    image = sitk.ReadImage(str(sample.image))
    values = sitk.GetArrayViewFromImage(image).astype(np.float32)
    mask = sitk.GetImageFromArray((values / values.max() > THRESHOLD).astype(np.uint8))
    mask.CopyInformation(image)
    return mask
