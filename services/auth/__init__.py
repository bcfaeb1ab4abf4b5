"""Identities: the cluster's certificate authority (mTLS) and its signed bearer tokens.

Everything lives under the state folder's auth/ (0700): see pki.py and tokens.py.
"""

import pathlib

AUTH_DIR = "auth"


def auth_dir(state_dir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(state_dir).absolute() / AUTH_DIR
