"""What objectives and probes both measure, as pure functions and torchmetrics metrics: novel-view synthesis
(:mod:`~selfsup3d.metrics.nvs`), camera-pose accuracy (:mod:`~selfsup3d.metrics.pose`), scene retrieval from
global features (:mod:`~selfsup3d.metrics.view_retrieval`) and from key-point sets
(:mod:`~selfsup3d.metrics.keypoint_retrieval`). Import from the submodules."""
