"""cpt: continual post-training of LLMs (see README.md and docs/DESIGN.md)."""

from cpt._source_checkout import install_callbacks_finder as _install_callbacks_finder

_install_callbacks_finder()  # `import cpt.callbacks` from a checkout that is not installed
