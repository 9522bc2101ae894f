"""Configuration: where conf/ lives, Hydra glue, start-up validation and the command-line exit path.

- ``paths``       the one lookup of the project root and conf/ (``SSD_LIGHTNING_ROOT``,
                  ``SSD_LIGHTNING_CONF_DIR``), and presets read from it
- ``resolvers``   the ``${ssd_*:}`` interpolations the YAML files use
- ``compose``     composing configs outside ``@hydra.main`` and instantiating with clear errors
- ``validation``  cross-field checks of a composed config, before anything heavy is built
- ``job_status``  the Hydra callback that writes ``<job dir>/job_status.json``
- ``atomic``      the one way a run's files are written: all or nothing
- ``cli``         the one error / exit path of every command-line tool
- ``errors``      the errors a user mistake becomes (``ConfigError``, ...), the tools' parser
- ``extras``      the optional dependencies, and the one message naming a missing one
"""

from ssd_lightning.config.errors import ConfigError

__all__ = ["ConfigError"]
