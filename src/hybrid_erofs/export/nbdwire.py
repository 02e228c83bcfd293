"""NBD wire format: magics, option/command/flag numbers and message structs (proto.md).

Shared by the server (export/nbd.py) and the protocol tests; all integers are big-endian.
"""

from __future__ import annotations

import struct

# proto.md "Newstyle negotiation": greeting = NBDMAGIC, IHAVEOPT, u16 handshake flags.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC" (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", also the magic of every client option
OPTION_REPLY_MAGIC = 0x3E889045565A9  # proto.md "Fixed newstyle negotiation"
REQUEST_MAGIC = 0x25609513  # proto.md "Request message"
SIMPLE_REPLY_MAGIC = 0x67446698  # proto.md "Simple reply message"
STRUCTURED_REPLY_MAGIC = 0x668E33EF  # proto.md "Structured reply chunk message"

# proto.md "Handshake flags" (server) and "Client flags".
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# proto.md "Transmission flags".
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10

# proto.md "Option types".
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4  # withdrawn
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11  # experimental; answered ERR_UNSUP

# proto.md "Option reply types"; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_ERR = 1 << 31
REP_ERR_UNSUP = _ERR | 1
REP_ERR_POLICY = _ERR | 2
REP_ERR_INVALID = _ERR | 3
REP_ERR_PLATFORM = _ERR | 4
REP_ERR_TLS_REQD = _ERR | 5
REP_ERR_UNKNOWN = _ERR | 6
REP_ERR_SHUTDOWN = _ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _ERR | 8
REP_ERR_TOO_BIG = _ERR | 9

# proto.md "NBD_OPT_INFO and NBD_OPT_GO": information types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# proto.md "Request types".
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# proto.md "Command flags".
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# proto.md "Structured reply types"; BLOCK_STATUS is 5 (nbd.h's 3 is stale, nbd-mount.md §1.5).
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# proto.md "Error values" (wire values, not the host's errno numbers).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# proto.md "Metadata querying": the one standard context; flags 0 = allocated data.
BASE_ALLOCATION = "base:allocation"

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+ 124 zeros)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

EXPORT_NAME_ZEROES = 124
