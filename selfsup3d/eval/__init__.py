"""The probe suite: how 3D-aware frozen features are (correspondence, depth, normals, relative pose,
classification, view retrieval), offline (``selfsup3d probe``) and online (``ProbeCallback``), and RayZer's pose
probe on camera tokens. Import from the submodules."""
