"""Publishing a finished sweep: a ready-to-upload Hugging Face model repository of the chosen
quants (`quantsweep publish`, the workflow's `publish` target).

Modules: `select` (which quants: by name or the report's marks, and their files), `shards`
(the engine's split, shard 1's metadata, the size, join and load checks), `model_keys` (the
general.* keys and the card's front matter), `card` (the README), `folder` (the folder written
whole or not at all, and `check_folder`).
"""

from .folder import Sweep, check_folder, hub_token, publish, scrub, upload_command

__all__ = ["Sweep", "check_folder", "hub_token", "publish", "scrub", "upload_command"]
