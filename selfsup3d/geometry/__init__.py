"""Geometry as small pure functions: cameras and SE(3) (:mod:`.cameras`), rays and Plücker maps
(:mod:`.rays`), and, for the rendering objectives, triplane sampling and volume rendering.

Import from the submodules (``from selfsup3d.geometry.cameras import look_at``)."""
