"""The objectives' heads: training-time scaffolding around the shared encoder (camera estimator, scene
reconstructor and renderer, triplane decoder and field, 3D feature grid, key points). Import from the submodules."""
