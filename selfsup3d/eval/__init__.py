"""Evaluation: novel-view and pose metrics, frozen-feature probes, scene retrieval. Import from the submodules."""
