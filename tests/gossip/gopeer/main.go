// gopeer: a real hashicorp/memberlist peer for vxnet's cross-checks (test code only).
//
// Build (no network needed, against Debian's golang-github-hashicorp-memberlist-dev):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o gopeer .
//
// Two modes:
//
//	gopeer wire
//	    One JSON command per stdin line, one JSON answer per stdout line ({"error": ...} on
//	    failure).  Byte strings are hex, except inside "fields", where []byte values use Go's
//	    encoding/json form (base64, null for a nil slice).  Commands ("op"):
//	      lzw_compress {data}            -> {data}    Go compress/lzw, LSB, litWidth 8
//	      lzw_decompress {data}          -> {data}
//	      encode {type, fields}          -> {data}    [type][msgpack] exactly as memberlist's encode
//	      decode {data}                  -> {type, fields}
//	      encrypt {key, vsn, data, aad}  -> {data}    security.go encryptPayload (random nonce)
//	      decrypt {keys, data, aad}      -> {data}    security.go decryptPayload
//	      packet {msgs, crc, compress, key, vsn}     -> {data}   net.go sendMsg/rawSendMsgPacket
//	      unpacket {data, keys, verify}  -> {msgs, truncated}    net.go ingestPacket/handleCommand
//	      stream {data, compress, key, vsn}          -> {data}   net.go rawSendMsgStream
//	      unstream {data, keys, verify}  -> {type, rest}         net.go readStream
//
//	gopeer node --name N --bind IP --port P [--advertise IP] [--key HEX ...] [--join IP:PORT ...]
//	            [--label L] [--members-interval 1s] [--no-compress] [--log-events]
//	    A real memberlist node (DefaultLANConfig).  Prints one JSON line per event on stdout:
//	    ready, join/leave/update, msg (user message received, hex), merge (remote user state),
//	    members (every --members-interval and on SIGUSR1 or the "members" command), sent,
//	    keys (after a key command: the installed keys, primary first), log (memberlist's log
//	    lines, with --log-events; they always go to stderr), error, shutdown.  Stdin commands:
//	    {"op":"send","node":N,"data":HEX,"reliable":bool}, {"op":"broadcast","data":HEX},
//	    {"op":"set_local_state","data":HEX}, {"op":"members"}, {"op":"install_key","key":HEX},
//	    {"op":"use_key","key":HEX}, {"op":"remove_key","key":HEX} (memberlist's Keyring
//	    AddKey/UseKey/RemoveKey, as Docker rotates keys), {"op":"leave"}.
//	    SIGTERM/SIGINT or "leave": Leave + Shutdown, exit 0.
package main

import (
	"bufio"
	"bytes"
	"compress/lzw"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"io/ioutil"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/hashicorp/go-msgpack/codec"
	"github.com/hashicorp/memberlist"
)

// ------------------------------------------------------------------ memberlist's wire structs
// Copied from memberlist v0.2.2 net.go: go-msgpack's encoding depends only on these definitions.

type ping struct {
	SeqNo      uint32
	Node       string
	SourceAddr []byte `codec:",omitempty"`
	SourcePort uint16 `codec:",omitempty"`
	SourceNode string `codec:",omitempty"`
}

type indirectPingReq struct {
	SeqNo      uint32
	Target     []byte
	Port       uint16
	Node       string
	Nack       bool
	SourceAddr []byte `codec:",omitempty"`
	SourcePort uint16 `codec:",omitempty"`
	SourceNode string `codec:",omitempty"`
}

type ackResp struct {
	SeqNo   uint32
	Payload []byte
}

type nackResp struct {
	SeqNo uint32
}

type errResp struct {
	Error string
}

type suspect struct {
	Incarnation uint32
	Node        string
	From        string
}

type alive struct {
	Incarnation uint32
	Node        string
	Addr        []byte
	Port        uint16
	Meta        []byte
	Vsn         []uint8
}

type dead struct {
	Incarnation uint32
	Node        string
	From        string
}

type pushPullHeader struct {
	Nodes        int
	UserStateLen int
	Join         bool
}

type userMsgHeader struct {
	UserMsgLen int
}

type pushNodeState struct {
	Name        string
	Addr        []byte
	Port        uint16
	Meta        []byte
	Incarnation uint32
	State       memberlist.NodeStateType
	Vsn         []uint8
}

type compress struct {
	Algo uint8
	Buf  []byte
}

// pushPull is the JSON view of a whole push/pull message (header, states, user state).
type pushPull struct {
	Join      bool
	Nodes     []pushNodeState
	UserState []byte
}

// user is the JSON view of a user message.
type user struct {
	Payload []byte
}

const (
	pingMsg         = 0
	indirectPingMsg = 1
	ackRespMsg      = 2
	suspectMsg      = 3
	aliveMsg        = 4
	deadMsg         = 5
	pushPullMsg     = 6
	compoundMsg     = 7
	userMsg         = 8
	compressMsg     = 9
	encryptMsg      = 10
	nackRespMsg     = 11
	hasCrcMsg       = 12
	errMsg          = 13
)

var typeNames = map[string]byte{
	"ping": pingMsg, "indirect_ping": indirectPingMsg, "ack": ackRespMsg, "suspect": suspectMsg,
	"alive": aliveMsg, "dead": deadMsg, "push_pull": pushPullMsg, "user": userMsg,
	"user_stream": userMsg, "nack": nackRespMsg, "err": errMsg, "compress": compressMsg,
}

// ------------------------------------------------------------------ util.go / security.go logic

func encode(msgType byte, in interface{}) ([]byte, error) {
	buf := bytes.NewBuffer(nil)
	buf.WriteByte(msgType)
	hd := codec.MsgpackHandle{}
	enc := codec.NewEncoder(buf, &hd)
	err := enc.Encode(in)
	return buf.Bytes(), err
}

func decode(buf []byte, out interface{}) error {
	hd := codec.MsgpackHandle{}
	return codec.NewDecoder(bytes.NewReader(buf), &hd).Decode(out)
}

func lzwCompress(inp []byte) ([]byte, error) {
	var buf bytes.Buffer
	w := lzw.NewWriter(&buf, lzw.LSB, 8)
	if _, err := w.Write(inp); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func lzwDecompress(inp []byte) ([]byte, error) {
	r := lzw.NewReader(bytes.NewReader(inp), lzw.LSB, 8)
	defer r.Close()
	var b bytes.Buffer
	_, err := io.Copy(&b, r)
	return b.Bytes(), err
}

func compressPayload(inp []byte) ([]byte, error) {
	buf, err := lzwCompress(inp)
	if err != nil {
		return nil, err
	}
	return encode(compressMsg, &compress{Algo: 0, Buf: buf})
}

func decompressPayload(msg []byte) ([]byte, error) {
	var c compress
	if err := decode(msg, &c); err != nil {
		return nil, err
	}
	if c.Algo != 0 {
		return nil, fmt.Errorf("Cannot decompress unknown algorithm %d", c.Algo)
	}
	return lzwDecompress(c.Buf)
}

func encryptedLength(vsn byte, inp int) int {
	if vsn >= 1 {
		return 1 + 12 + inp + 16
	}
	return 1 + 12 + inp + (16 - inp%16) + 16
}

func encryptPayload(vsn byte, key, msg, data []byte) ([]byte, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, 12)
	if _, err := io.ReadFull(rand.Reader, nonce); err != nil {
		return nil, err
	}
	src := msg
	if vsn == 0 {
		more := 16 - len(msg)%16
		src = append(append([]byte{}, msg...), bytes.Repeat([]byte{byte(more)}, more)...)
	}
	out := append([]byte{vsn}, nonce...)
	return append(out, gcm.Seal(nil, nonce, src, data)...), nil
}

func decryptPayload(keys [][]byte, msg, data []byte) ([]byte, error) {
	if len(msg) == 0 {
		return nil, fmt.Errorf("Cannot decrypt empty payload")
	}
	vsn := msg[0]
	if vsn > 1 {
		return nil, fmt.Errorf("Unsupported encryption version %d", msg[0])
	}
	if len(msg) < encryptedLength(vsn, 0) {
		return nil, fmt.Errorf("Payload is too small to decrypt: %d", len(msg))
	}
	for _, key := range keys {
		block, err := aes.NewCipher(key)
		if err != nil {
			return nil, err
		}
		gcm, err := cipher.NewGCM(block)
		if err != nil {
			return nil, err
		}
		plain, err := gcm.Open(nil, msg[1:13], msg[13:], data)
		if err == nil {
			if vsn == 0 {
				return plain[:len(plain)-int(plain[len(plain)-1])], nil
			}
			return plain, nil
		}
	}
	return nil, fmt.Errorf("No installed keys could decrypt the message")
}

func makeCompoundMessage(msgs [][]byte) []byte {
	buf := bytes.NewBuffer(nil)
	buf.WriteByte(compoundMsg)
	buf.WriteByte(uint8(len(msgs)))
	for _, m := range msgs {
		binary.Write(buf, binary.BigEndian, uint16(len(m)))
	}
	for _, m := range msgs {
		buf.Write(m)
	}
	return buf.Bytes()
}

func decodeCompoundMessage(buf []byte) (trunc int, parts [][]byte, err error) {
	if len(buf) < 1 {
		return 0, nil, fmt.Errorf("missing compound length byte")
	}
	numParts := int(buf[0])
	buf = buf[1:]
	if len(buf) < numParts*2 {
		return 0, nil, fmt.Errorf("truncated len slice")
	}
	lengths := make([]uint16, numParts)
	for i := 0; i < numParts; i++ {
		lengths[i] = binary.BigEndian.Uint16(buf[i*2 : i*2+2])
	}
	buf = buf[numParts*2:]
	for idx, msgLen := range lengths {
		if len(buf) < int(msgLen) {
			return numParts - idx, parts, nil
		}
		parts = append(parts, buf[:msgLen])
		buf = buf[msgLen:]
	}
	return 0, parts, nil
}

// ------------------------------------------------------------------ wire mode

type wireCmd struct {
	Op       string          `json:"op"`
	Data     string          `json:"data"`
	Type     string          `json:"type"`
	Fields   json.RawMessage `json:"fields"`
	Key      string          `json:"key"`
	Keys     []string        `json:"keys"`
	Vsn      byte            `json:"vsn"`
	Aad      string          `json:"aad"`
	Msgs     []string        `json:"msgs"`
	Crc      bool            `json:"crc"`
	Compress bool            `json:"compress"`
	Verify   bool            `json:"verify"`
}

func unhex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(fmt.Errorf("bad hex: %v", err))
	}
	return b
}

func unhexAll(ss []string) [][]byte {
	out := make([][]byte, len(ss))
	for i, s := range ss {
		out[i] = unhex(s)
	}
	return out
}

func wireEncode(c *wireCmd) ([]byte, error) {
	t, ok := typeNames[c.Type]
	if !ok {
		return nil, fmt.Errorf("unknown type %q", c.Type)
	}
	var target interface{}
	switch c.Type {
	case "ping":
		target = &ping{}
	case "indirect_ping":
		target = &indirectPingReq{}
	case "ack":
		target = &ackResp{}
	case "nack":
		target = &nackResp{}
	case "err":
		target = &errResp{}
	case "suspect":
		target = &suspect{}
	case "alive":
		target = &alive{}
	case "dead":
		target = &dead{}
	case "compress":
		target = &compress{}
	case "push_pull", "user", "user_stream":
	}
	if target != nil {
		if err := json.Unmarshal(c.Fields, target); err != nil {
			return nil, err
		}
		return encode(t, target)
	}
	if c.Type == "push_pull" {
		var pp pushPull
		if err := json.Unmarshal(c.Fields, &pp); err != nil {
			return nil, err
		}
		return encodePushPull(&pp)
	}
	var u user
	if err := json.Unmarshal(c.Fields, &u); err != nil {
		return nil, err
	}
	if c.Type == "user" {
		return append([]byte{userMsg}, u.Payload...), nil
	}
	// As sendUserMsg builds it for a stream: [8][userMsgHeader][payload].
	out, err := encode(userMsg, &userMsgHeader{UserMsgLen: len(u.Payload)})
	return append(out, u.Payload...), err
}

// encodePushPull mirrors sendLocalState's buffer (before compression/encryption).
func encodePushPull(pp *pushPull) ([]byte, error) {
	buf := bytes.NewBuffer(nil)
	hd := codec.MsgpackHandle{}
	enc := codec.NewEncoder(buf, &hd)
	buf.WriteByte(pushPullMsg)
	header := pushPullHeader{Nodes: len(pp.Nodes), UserStateLen: len(pp.UserState), Join: pp.Join}
	if err := enc.Encode(&header); err != nil {
		return nil, err
	}
	for i := range pp.Nodes {
		if err := enc.Encode(&pp.Nodes[i]); err != nil {
			return nil, err
		}
	}
	if pp.UserState != nil {
		buf.Write(pp.UserState)
	}
	return buf.Bytes(), nil
}

// readRemoteState mirrors net.go's readRemoteState.
func readRemoteState(r io.Reader, dec *codec.Decoder) (*pushPull, error) {
	var header pushPullHeader
	if err := dec.Decode(&header); err != nil {
		return nil, err
	}
	pp := &pushPull{Join: header.Join, Nodes: make([]pushNodeState, header.Nodes)}
	for i := 0; i < header.Nodes; i++ {
		if err := dec.Decode(&pp.Nodes[i]); err != nil {
			return nil, err
		}
	}
	if header.UserStateLen > 0 {
		pp.UserState = make([]byte, header.UserStateLen)
		if _, err := io.ReadFull(r, pp.UserState); err != nil {
			return nil, err
		}
	}
	return pp, nil
}

func wireDecode(data []byte) (map[string]interface{}, error) {
	if len(data) == 0 {
		return nil, fmt.Errorf("empty message")
	}
	t, body := data[0], data[1:]
	var out interface{}
	switch t {
	case pingMsg:
		out = &ping{}
	case indirectPingMsg:
		out = &indirectPingReq{}
	case ackRespMsg:
		out = &ackResp{}
	case nackRespMsg:
		out = &nackResp{}
	case errMsg:
		out = &errResp{}
	case suspectMsg:
		out = &suspect{}
	case aliveMsg:
		out = &alive{}
	case deadMsg:
		out = &dead{}
	case compressMsg:
		out = &compress{}
	case userMsg:
		out = &user{Payload: body}
	case pushPullMsg:
		r := bytes.NewReader(body)
		hd := codec.MsgpackHandle{}
		pp, err := readRemoteState(r, codec.NewDecoder(r, &hd))
		if err != nil {
			return nil, err
		}
		out = pp
	default:
		return nil, fmt.Errorf("unknown message type %d", t)
	}
	if t != userMsg && t != pushPullMsg {
		if err := decode(body, out); err != nil {
			return nil, err
		}
	}
	return map[string]interface{}{"type": t, "fields": out}, nil
}

// wirePacket mirrors sendMsg (compound) + rawSendMsgPacket (compress, CRC, encrypt).
func wirePacket(c *wireCmd) ([]byte, error) {
	msgs := unhexAll(c.Msgs)
	if len(msgs) == 0 {
		return nil, fmt.Errorf("no messages")
	}
	msg := msgs[0]
	if len(msgs) > 1 {
		msg = makeCompoundMessage(msgs)
	}
	if c.Compress {
		buf, err := compressPayload(msg)
		if err != nil {
			return nil, err
		}
		if len(buf) < len(msg) {
			msg = buf
		}
	}
	if c.Crc {
		header := make([]byte, 5, 5+len(msg))
		header[0] = hasCrcMsg
		binary.BigEndian.PutUint32(header[1:], crc32.ChecksumIEEE(msg))
		msg = append(header, msg...)
	}
	if c.Key != "" {
		return encryptPayload(c.Vsn, unhex(c.Key), msg, nil)
	}
	return msg, nil
}

// wireUnpacket mirrors ingestPacket + handleCommand, collecting the leaf messages.
func wireUnpacket(c *wireCmd) (map[string]interface{}, error) {
	buf := unhex(c.Data)
	if len(c.Keys) > 0 {
		plain, err := decryptPayload(unhexAll(c.Keys), buf, nil)
		if err != nil && c.Verify {
			return nil, err
		}
		if err == nil {
			buf = plain
		}
	}
	if len(buf) >= 5 && buf[0] == hasCrcMsg {
		if crc32.ChecksumIEEE(buf[5:]) != binary.BigEndian.Uint32(buf[1:5]) {
			return nil, fmt.Errorf("invalid checksum")
		}
		buf = buf[5:]
	}
	var msgs []string
	trunc := 0
	var walk func(b []byte) error
	walk = func(b []byte) error {
		if len(b) == 0 {
			return fmt.Errorf("empty message")
		}
		switch b[0] {
		case compoundMsg:
			t, parts, err := decodeCompoundMessage(b[1:])
			if err != nil {
				return err
			}
			trunc += t
			for _, p := range parts {
				if err := walk(p); err != nil {
					return err
				}
			}
		case compressMsg:
			payload, err := decompressPayload(b[1:])
			if err != nil {
				return err
			}
			return walk(payload)
		default:
			msgs = append(msgs, hex.EncodeToString(b))
		}
		return nil
	}
	if err := walk(buf); err != nil {
		return nil, err
	}
	return map[string]interface{}{"msgs": msgs, "truncated": trunc}, nil
}

// wireStream mirrors rawSendMsgStream + encryptLocalState.
func wireStream(c *wireCmd) ([]byte, error) {
	sendBuf := unhex(c.Data)
	if c.Compress {
		b, err := compressPayload(sendBuf)
		if err != nil {
			return nil, err
		}
		sendBuf = b
	}
	if c.Key == "" {
		return sendBuf, nil
	}
	head := make([]byte, 5)
	head[0] = encryptMsg
	binary.BigEndian.PutUint32(head[1:], uint32(encryptedLength(c.Vsn, len(sendBuf))))
	ct, err := encryptPayload(c.Vsn, unhex(c.Key), sendBuf, head)
	if err != nil {
		return nil, err
	}
	return append(head, ct...), nil
}

// wireUnstream mirrors readStream: returns the message type and the rest of its reader.
func wireUnstream(c *wireCmd) (map[string]interface{}, error) {
	var r io.Reader = bufio.NewReader(bytes.NewReader(unhex(c.Data)))
	first := [1]byte{}
	if _, err := io.ReadFull(r, first[:]); err != nil {
		return nil, err
	}
	msgType := first[0]
	if msgType == encryptMsg {
		if len(c.Keys) == 0 {
			return nil, fmt.Errorf("Remote state is encrypted and encryption is not configured")
		}
		head := []byte{encryptMsg, 0, 0, 0, 0}
		if _, err := io.ReadFull(r, head[1:]); err != nil {
			return nil, err
		}
		ct := make([]byte, binary.BigEndian.Uint32(head[1:]))
		if _, err := io.ReadFull(r, ct); err != nil {
			return nil, err
		}
		plain, err := decryptPayload(unhexAll(c.Keys), ct, head)
		if err != nil {
			return nil, err
		}
		msgType, r = plain[0], bytes.NewReader(plain[1:])
	} else if len(c.Keys) > 0 && c.Verify {
		return nil, fmt.Errorf("Encryption is configured but remote state is not encrypted")
	}
	if msgType == compressMsg {
		hd := codec.MsgpackHandle{}
		var cm compress
		if err := codec.NewDecoder(r, &hd).Decode(&cm); err != nil {
			return nil, err
		}
		if cm.Algo != 0 {
			return nil, fmt.Errorf("Cannot decompress unknown algorithm %d", cm.Algo)
		}
		decomp, err := lzwDecompress(cm.Buf)
		if err != nil {
			return nil, err
		}
		msgType, r = decomp[0], bytes.NewReader(decomp[1:])
	}
	rest, err := ioutil.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return map[string]interface{}{"type": msgType, "rest": hex.EncodeToString(rest)}, nil
}

func wireOne(c *wireCmd) (res map[string]interface{}, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v", r)
		}
	}()
	data := func(b []byte, err error) (map[string]interface{}, error) {
		if err != nil {
			return nil, err
		}
		return map[string]interface{}{"data": hex.EncodeToString(b)}, nil
	}
	switch c.Op {
	case "lzw_compress":
		return data(lzwCompress(unhex(c.Data)))
	case "lzw_decompress":
		return data(lzwDecompress(unhex(c.Data)))
	case "encode":
		return data(wireEncode(c))
	case "decode":
		return wireDecode(unhex(c.Data))
	case "encrypt":
		return data(encryptPayload(c.Vsn, unhex(c.Key), unhex(c.Data), unhex(c.Aad)))
	case "decrypt":
		return data(decryptPayload(unhexAll(c.Keys), unhex(c.Data), unhex(c.Aad)))
	case "packet":
		return data(wirePacket(c))
	case "unpacket":
		return wireUnpacket(c)
	case "stream":
		return data(wireStream(c))
	case "unstream":
		return wireUnstream(c)
	}
	return nil, fmt.Errorf("unknown op %q", c.Op)
}

func runWire() {
	in := bufio.NewReader(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	enc := json.NewEncoder(out)
	for {
		line, err := in.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			var c wireCmd
			var res map[string]interface{}
			var werr error
			if jerr := json.Unmarshal(line, &c); jerr != nil {
				werr = jerr
			} else {
				res, werr = wireOne(&c)
			}
			if werr != nil {
				res = map[string]interface{}{"error": werr.Error()}
			}
			enc.Encode(res)
			out.Flush()
		}
		if err != nil {
			return
		}
	}
}

// ------------------------------------------------------------------ node mode

type printer struct{ mu sync.Mutex }

func (p *printer) emit(v map[string]interface{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

var out printer

var stateNames = map[memberlist.NodeStateType]string{
	memberlist.StateAlive: "alive", memberlist.StateSuspect: "suspect",
	memberlist.StateDead: "dead", memberlist.StateLeft: "left",
}

// nodeState mirrors memberlist v0.2.2's unexported state.go nodeState.  v0.2.2 never sets
// Node.State: the real state is nodeState.State, next to the embedded Node.  Every *Node that
// memberlist hands out (events, Members, LocalNode) points into a nodeState, so we read it there.
type nodeState struct {
	memberlist.Node
	Incarnation uint32
	State       memberlist.NodeStateType
	StateChange time.Time
}

func realState(n *memberlist.Node) (memberlist.NodeStateType, uint32) {
	s := (*nodeState)(unsafe.Pointer(n))
	if s.State < memberlist.StateAlive || s.State > memberlist.StateLeft {
		return n.State, 0 // not memberlist's layout after all
	}
	return s.State, s.Incarnation
}

func nodeJSON(n *memberlist.Node) map[string]interface{} {
	state, incarnation := realState(n)
	return map[string]interface{}{
		"node": n.Name, "addr": n.Addr.String(), "port": n.Port, "state": stateNames[state],
		"incarnation": incarnation, "meta": hex.EncodeToString(n.Meta),
		"vsn": []int{int(n.PMin), int(n.PMax), int(n.PCur), int(n.DMin), int(n.DMax), int(n.DCur)},
	}
}

type events struct{}

func (events) NotifyJoin(n *memberlist.Node)   { emitNode("join", n) }
func (events) NotifyLeave(n *memberlist.Node)  { emitNode("leave", n) }
func (events) NotifyUpdate(n *memberlist.Node) { emitNode("update", n) }

func emitNode(event string, n *memberlist.Node) {
	v := nodeJSON(n)
	v["event"] = event
	out.emit(v)
}

type broadcast []byte

func (b broadcast) Invalidates(memberlist.Broadcast) bool { return false }
func (b broadcast) Message() []byte                       { return b }
func (b broadcast) Finished()                             {}

type delegate struct {
	mu         sync.Mutex
	localState []byte
	queue      *memberlist.TransmitLimitedQueue
	keyring    *memberlist.Keyring
}

func (d *delegate) NodeMeta(limit int) []byte { return nil }
func (d *delegate) NotifyMsg(b []byte) {
	out.emit(map[string]interface{}{"event": "msg", "data": hex.EncodeToString(b)})
}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.queue.GetBroadcasts(overhead, limit)
}
func (d *delegate) LocalState(join bool) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.localState
}
func (d *delegate) MergeRemoteState(buf []byte, join bool) {
	out.emit(map[string]interface{}{"event": "merge", "data": hex.EncodeToString(buf), "join": join})
}

// labelTransport adds/strips memberlist v0.3's `[244][len][label]` header (packets and streams)
// around a NetTransport, for a v0.2.2 library that has no labels.  Only used without encryption:
// with a label, v0.3 also authenticates the label (GCM additional data), which a transport
// wrapper cannot reproduce.
type labelTransport struct {
	inner    *memberlist.NetTransport
	header   []byte
	packetCh chan *memberlist.Packet
	streamCh chan net.Conn
}

type peekConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func newLabelTransport(inner *memberlist.NetTransport, label string) *labelTransport {
	t := &labelTransport{
		inner:    inner,
		header:   append([]byte{244, byte(len(label))}, label...),
		packetCh: make(chan *memberlist.Packet),
		streamCh: make(chan net.Conn),
	}
	go func() {
		for p := range inner.PacketCh() {
			if bytes.HasPrefix(p.Buf, t.header) {
				p.Buf = p.Buf[len(t.header):]
				t.packetCh <- p
			}
		}
	}()
	go func() {
		for conn := range inner.StreamCh() {
			go t.acceptStream(conn)
		}
	}()
	return t
}

func (t *labelTransport) acceptStream(conn net.Conn) {
	r := bufio.NewReader(conn)
	head := make([]byte, len(t.header))
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(r, head); err != nil || !bytes.Equal(head, t.header) {
		conn.Close()
		return
	}
	conn.SetDeadline(time.Time{})
	t.streamCh <- &peekConn{conn, r}
}

// The plain Transport interface only (no WriteToAddress/DialAddressTimeout), so that memberlist
// wraps it in its shim and every packet and stream goes through the methods below.
func (t *labelTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	return t.inner.FinalAdvertiseAddr(ip, port)
}
func (t *labelTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.inner.WriteTo(append(append([]byte{}, t.header...), b...), addr)
}
func (t *labelTransport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }
func (t *labelTransport) StreamCh() <-chan net.Conn           { return t.streamCh }
func (t *labelTransport) Shutdown() error                     { return t.inner.Shutdown() }
func (t *labelTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	conn, err := t.inner.DialTimeout(addr, timeout)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Write(t.header); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func fatal(format string, args ...interface{}) {
	out.emit(map[string]interface{}{"event": "fatal", "error": fmt.Sprintf(format, args...)})
	os.Exit(2)
}

func buildConfig(fs *flag.FlagSet, args []string, d *delegate) *memberlist.Config {
	name := fs.String("name", "", "node name")
	bind := fs.String("bind", "127.0.0.1", "bind address")
	port := fs.Int("port", 7946, "bind port (TCP and UDP)")
	advertise := fs.String("advertise", "", "advertise address (default: bind)")
	label := fs.String("label", "", "memberlist v0.3 label (no encryption)")
	noCompress := fs.Bool("no-compress", false, "disable compression")
	logEvents := fs.Bool("log-events", false, "also print memberlist's log lines as log events")
	var keys multiFlag
	fs.Var(&keys, "key", "hex AES key (repeat; first is primary)")
	fs.Parse(args)
	if *name == "" {
		fatal("--name is required")
	}
	conf := memberlist.DefaultLANConfig()
	conf.Name = *name
	conf.BindAddr, conf.BindPort = *bind, *port
	conf.AdvertiseAddr, conf.AdvertisePort = *bind, *port
	if *advertise != "" {
		conf.AdvertiseAddr = *advertise
	}
	conf.EnableCompression = !*noCompress
	conf.Events = events{}
	conf.Delegate = d
	conf.LogOutput = os.Stderr
	if *logEvents {
		conf.LogOutput = io.MultiWriter(os.Stderr, logEmitter{})
	}
	if len(keys) > 0 {
		raw := unhexAll(keys)
		ring, err := memberlist.NewKeyring(raw, raw[0])
		if err != nil {
			fatal("keyring: %v", err)
		}
		conf.Keyring = ring
		d.keyring = ring
		conf.GossipVerifyIncoming, conf.GossipVerifyOutgoing = true, true
	}
	if *label != "" {
		if len(keys) > 0 || len(*label) > 255 {
			fatal("--label needs no --key and at most 255 bytes")
		}
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{*bind}, BindPort: *port,
			Logger: log.New(os.Stderr, "", log.LstdFlags),
		})
		if err != nil {
			fatal("transport: %v", err)
		}
		conf.Transport = newLabelTransport(nt, *label)
	}
	return conf
}

func printMembers(m *memberlist.Memberlist) {
	var members []map[string]interface{}
	for _, n := range m.Members() {
		members = append(members, nodeJSON(n))
	}
	out.emit(map[string]interface{}{"event": "members", "members": members})
}

func findNode(m *memberlist.Memberlist, name string) *memberlist.Node {
	for _, n := range m.Members() {
		if n.Name == name {
			return n
		}
	}
	return nil
}

func stop(m *memberlist.Memberlist) {
	if err := m.Leave(2 * time.Second); err != nil {
		out.emit(map[string]interface{}{"event": "error", "error": "leave: " + err.Error()})
	}
	m.Shutdown()
	out.emit(map[string]interface{}{"event": "shutdown"})
	os.Exit(0)
}

type nodeCmd struct {
	Op       string `json:"op"`
	Node     string `json:"node"`
	Data     string `json:"data"`
	Key      string `json:"key"`
	Reliable bool   `json:"reliable"`
}

// logEmitter turns each line memberlist logs into a {"event":"log"} line on stdout.
type logEmitter struct{}

func (logEmitter) Write(b []byte) (int, error) {
	out.emit(map[string]interface{}{"event": "log", "line": strings.TrimRight(string(b), "\n")})
	return len(b), nil
}

// keyCommand runs install_key/use_key/remove_key on the node's keyring and reports the keys.
func keyCommand(d *delegate, c *nodeCmd) error {
	if d.keyring == nil {
		return fmt.Errorf("this node has no keyring (start it with --key)")
	}
	key, err := hex.DecodeString(c.Key)
	if err != nil {
		return err
	}
	switch c.Op {
	case "install_key":
		err = d.keyring.AddKey(key)
	case "use_key":
		err = d.keyring.UseKey(key)
	default:
		err = d.keyring.RemoveKey(key)
	}
	if err != nil {
		return err
	}
	var keys []string
	for _, k := range d.keyring.GetKeys() {
		keys = append(keys, hex.EncodeToString(k))
	}
	out.emit(map[string]interface{}{"event": "keys", "op": c.Op, "keys": keys})
	return nil
}

func nodeCommand(m *memberlist.Memberlist, d *delegate, c *nodeCmd) error {
	switch c.Op {
	case "send":
		n := findNode(m, c.Node)
		if n == nil {
			return fmt.Errorf("no live member %q", c.Node)
		}
		data, err := hex.DecodeString(c.Data)
		if err != nil {
			return err
		}
		if c.Reliable {
			err = m.SendReliable(n, data)
		} else {
			err = m.SendBestEffort(n, data)
		}
		if err == nil {
			out.emit(map[string]interface{}{"event": "sent", "node": c.Node})
		}
		return err
	case "broadcast":
		data, err := hex.DecodeString(c.Data)
		if err == nil {
			d.queue.QueueBroadcast(broadcast(data))
		}
		return err
	case "set_local_state":
		data, err := hex.DecodeString(c.Data)
		if err == nil {
			d.mu.Lock()
			d.localState = data
			d.mu.Unlock()
		}
		return err
	case "members":
		printMembers(m)
		return nil
	case "install_key", "use_key", "remove_key":
		return keyCommand(d, c)
	case "leave":
		stop(m)
	}
	return fmt.Errorf("unknown op %q", c.Op)
}

func runNode(args []string) {
	fs := flag.NewFlagSet("node", flag.ExitOnError)
	var joins multiFlag
	fs.Var(&joins, "join", "IP:PORT to join (repeat)")
	interval := fs.Duration("members-interval", time.Second, "print members this often (0: never)")
	d := &delegate{}
	conf := buildConfig(fs, args, d)
	m, err := memberlist.Create(conf)
	if err != nil {
		fatal("create: %v", err)
	}
	d.queue = &memberlist.TransmitLimitedQueue{NumNodes: m.NumMembers, RetransmitMult: conf.RetransmitMult}
	joined := 0
	if len(joins) > 0 {
		if joined, err = m.Join(joins); err != nil {
			out.emit(map[string]interface{}{"event": "error", "error": "join: " + err.Error()})
		}
	}
	local := nodeJSON(m.LocalNode())
	local["event"], local["joined"] = "ready", joined
	out.emit(local)

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1)
	cmds := make(chan *nodeCmd)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			var c nodeCmd
			if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
				out.emit(map[string]interface{}{"event": "error", "error": err.Error()})
				continue
			}
			cmds <- &c
		}
	}()
	var tick <-chan time.Time
	if *interval > 0 {
		tick = time.NewTicker(*interval).C
	}
	for {
		select {
		case s := <-sigs:
			if s == syscall.SIGUSR1 {
				printMembers(m)
			} else {
				stop(m)
			}
		case c := <-cmds:
			if err := nodeCommand(m, d, c); err != nil {
				out.emit(map[string]interface{}{"event": "error", "op": c.Op, "error": err.Error()})
			}
		case <-tick:
			printMembers(m)
		}
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: gopeer wire | gopeer node --name N --bind IP --port P ...")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "wire":
		runWire()
	case "node":
		runNode(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, errors.New("unknown mode "+os.Args[1]))
		os.Exit(2)
	}
}
