"""Making shards (``selfsup3d data ...``): the reading side is :mod:`selfsup3d.datamodules`, the format both
follow is :mod:`selfsup3d.datamodules.format` (``docs/shard-format.md``).

* :mod:`~selfsup3d.datamodules.prepare.render`: the embedded data set, pybullet's objects rendered on the CPU;
* one converter per source format: :mod:`~selfsup3d.datamodules.prepare.blender` (NeRF/Blender
  ``transforms*.json``), :mod:`~selfsup3d.datamodules.prepare.colmap` (COLMAP text models),
  :mod:`~selfsup3d.datamodules.prepare.images` (an image folder, single-view),
  :mod:`~selfsup3d.datamodules.prepare.video` (videos) and :mod:`~selfsup3d.datamodules.prepare.sequences`
  (frame folders) as unposed clips (:mod:`~selfsup3d.datamodules.prepare.clips`), the papers' data sets as
  posed scenes (:mod:`~selfsup3d.datamodules.prepare.re10k`, :mod:`~selfsup3d.datamodules.prepare.lvsm`,
  :mod:`~selfsup3d.datamodules.prepare.dl3dv`, :mod:`~selfsup3d.datamodules.prepare.co3d`), on the shared
  :mod:`~selfsup3d.datamodules.prepare.writer` (shard writing, skip lists, progress),
  :mod:`~selfsup3d.datamodules.prepare.journal` (resumable writing and ``--part i/n``, for any converter) and
  :mod:`~selfsup3d.datamodules.prepare.frames` (image files, intrinsics, capture order);
* :mod:`~selfsup3d.datamodules.prepare.pseudo_depth`: monocular pseudo depth for single-view samples and scenes.

A new source is one module here with its ``convert_<source>`` function (and one test).
"""
