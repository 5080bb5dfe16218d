"""Communication methods; each is a dataclass whose ``answer(example)`` returns a :class:`MethodOutput`."""

from kvcomm.methods.base import Method, MethodOutput
from kvcomm.methods.baseline import Baseline
from kvcomm.methods.cipher import CIPHER
from kvcomm.methods.kvcomm import KVComm
from kvcomm.methods.nld import NLD
from kvcomm.methods.skyline import Skyline

__all__ = ["Baseline", "CIPHER", "KVComm", "Method", "MethodOutput", "NLD", "Skyline"]
