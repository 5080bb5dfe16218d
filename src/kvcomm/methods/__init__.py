"""Communication methods; each is a dataclass whose ``answer(example)`` returns a :class:`MethodOutput`."""

from kvcomm.methods.ac import AC
from kvcomm.methods.base import Method, MethodOutput
from kvcomm.methods.baseline import Baseline
from kvcomm.methods.cipher import CIPHER
from kvcomm.methods.kvcomm import KVComm
from kvcomm.methods.kvcomm_s import KVCommS
from kvcomm.methods.multi_sender import MultiSenderKVComm
from kvcomm.methods.nld import NLD
from kvcomm.methods.skyline import Skyline

__all__ = ["AC", "Baseline", "CIPHER", "KVComm", "KVCommS", "Method", "MethodOutput", "MultiSenderKVComm", "NLD",
           "Skyline"]
