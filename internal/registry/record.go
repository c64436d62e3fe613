package registry

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/link"
)

// A node record, the value at <prefix>/nodes/<name>, put by the node's own
// agent under its lease and watched by every agent. It is small on
// purpose (at most MaxRecordSize bytes) — every agent receives every change of every record — and
// carries no certificate, only the fingerprint of the one the node's
// agent presents (the certificate is at <prefix>/certs/<name>, read when
// a link is made):
//
//	{"v":1,"addresses":["10.0.0.1:7701"],"instance":"<32 hex digits>",
//	 "fingerprint":"<64 hex digits>"}
//
// The node's name is the key's last segment, never a field: a record
// cannot speak for another key. Readers accept exactly this: at most
// MaxRecordSize bytes, one JSON object with these four fields spelt exactly so
// and no other, version 1, 1 to config.MaxAdvertise addresses each a
// dialable host:port, the instance and fingerprint in lowercase hex of
// their length. Anything else is refused whole, with an error that says
// what was wrong.

// RecordVersion is the record version this package writes and reads.
const RecordVersion = 1

// recordFields are a record's fields, all required.
var recordFields = []string{"v", "addresses", "instance", "fingerprint"}

type record struct {
	V           int      `json:"v"`
	Addresses   []string `json:"addresses"`
	Instance    string   `json:"instance"`
	Fingerprint string   `json:"fingerprint"`
}

// EncodeRecord returns n's record (its name goes in the key).
func EncodeRecord(n Node) ([]byte, error) {
	b, err := json.Marshal(record{V: RecordVersion, Addresses: n.Addresses,
		Instance: hex.EncodeToString(n.Instance[:]), Fingerprint: n.Fingerprint.String()})
	if err != nil {
		return nil, err
	}
	if _, err := ParseRecord(n.Name, b); err != nil {
		return nil, fmt.Errorf("the record of %s would not be read back: %w", n.Name, err)
	}
	return b, nil
}

// ParseRecord reads the record of node name (from its key).
func ParseRecord(name string, data []byte) (Node, error) {
	if err := cert.ValidName(name); err != nil {
		return Node{}, fmt.Errorf("key: %w", err)
	}
	if len(data) > MaxRecordSize {
		return Node{}, fmt.Errorf("record is %d bytes, more than %d", len(data), MaxRecordSize)
	}
	var r record
	if !quickRecord(data, &r) {
		// Field names are matched exactly (encoding/json alone would
		// take "Addresses" for addresses, and the last of a field given
		// twice).
		if err := checkFields(data); err != nil {
			return Node{}, err
		}
		r = record{}
		if err := strictJSON(data, &r); err != nil {
			return Node{}, fmt.Errorf("record: %w", err)
		}
	}
	if r.V != RecordVersion {
		return Node{}, fmt.Errorf("record version %d, want %d", r.V, RecordVersion)
	}
	n := Node{Name: name}
	if len(r.Addresses) == 0 || len(r.Addresses) > config.MaxAdvertise {
		return Node{}, fmt.Errorf("record has %d addresses, want 1 to %d", len(r.Addresses), config.MaxAdvertise)
	}
	for i, a := range r.Addresses {
		if err := config.CheckAdvertised(a); err != nil {
			return Node{}, fmt.Errorf("record address %d: %w", i, err)
		}
	}
	n.Addresses = slices.Clip(r.Addresses)
	if err := decodeHex(n.Instance[:], r.Instance); err != nil {
		return Node{}, fmt.Errorf("record instance: %w", err)
	}
	if n.Instance == ([link.InstanceSize]byte{}) {
		return Node{}, errors.New("record instance is zero")
	}
	if err := decodeHex(n.Fingerprint[:], r.Fingerprint); err != nil {
		return Node{}, fmt.Errorf("record fingerprint: %w", err)
	}
	return n, nil
}

// quickRecord reads data into r if it is exactly as EncodeRecord writes
// it — compact, the fields in their order, strings that need no escape —
// and reports whether it was. Such a record has each field once, spelt
// exactly so, nothing else and nothing after, and its strings decode to
// their bytes: checkFields and strictJSON would accept it and decode the
// same record. They cost some forty times as much, and every agent parses
// every record (a thousand agents starting at once parse a million). Any
// other data takes the strict path, which accepts and refuses what it did
// before this one.
func quickRecord(data []byte, r *record) bool {
	rest, ok := bytes.CutPrefix(data, []byte(`{"v":1,"addresses":[`))
	if !ok {
		return false
	}
	r.V = 1
	for {
		var a string
		if a, rest, ok = quickString(rest); !ok || len(rest) == 0 || len(r.Addresses) == config.MaxAdvertise {
			return false
		}
		r.Addresses = append(r.Addresses, a)
		if rest[0] != ',' {
			break
		}
		rest = rest[1:]
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(`],"instance":`)); !ok {
		return false
	}
	if r.Instance, rest, ok = quickString(rest); !ok {
		return false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(`,"fingerprint":`)); !ok {
		return false
	}
	if r.Fingerprint, rest, ok = quickString(rest); !ok {
		return false
	}
	return string(rest) == "}"
}

// quickString reads the JSON string at the start of b if json.Marshal
// writes its content unchanged (printable ASCII but '"', '\\', '<', '>'
// and '&'), and returns it and what follows.
func quickString(b []byte) (s string, rest []byte, ok bool) {
	if len(b) == 0 || b[0] != '"' {
		return "", nil, false
	}
	for i := 1; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			return string(b[1:i]), b[i+1:], true
		case c < 0x20 || c >= 0x7f || c == '\\' || c == '<' || c == '>' || c == '&':
			return "", nil, false
		}
	}
	return "", nil, false
}

// checkFields checks that data is one JSON object with each of
// recordFields once, spelt exactly so, and no other field.
func checkFields(data []byte) error {
	d := json.NewDecoder(bytes.NewReader(data))
	if t, err := d.Token(); err != nil || t != json.Delim('{') {
		return errors.New("record is not a JSON object")
	}
	seen := make(map[string]bool, len(recordFields))
	for d.More() {
		t, err := d.Token()
		if err != nil {
			return fmt.Errorf("record is not a JSON object: %w", err)
		}
		k, _ := t.(string)
		if !slices.Contains(recordFields, k) {
			return fmt.Errorf("record has an unknown field %.40q", k)
		}
		if seen[k] {
			return fmt.Errorf("record has field %q twice", k)
		}
		seen[k] = true
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return fmt.Errorf("record field %q: %w", k, err)
		}
	}
	for _, k := range recordFields {
		if !seen[k] {
			return fmt.Errorf("record has no field %q", k)
		}
	}
	return nil
}

// strictJSON decodes exactly one JSON value from data into v, with
// nothing after it.
func strictJSON(data []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(data))
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return errors.New("data after the object")
	}
	if _, err := d.Token(); err == nil {
		return errors.New("data after the object")
	}
	return nil
}

// decodeHex reads s, lowercase hex of exactly len(dst) bytes, into dst.
func decodeHex(dst []byte, s string) error {
	if len(s) != 2*len(dst) {
		return fmt.Errorf("%d characters, want %d hex digits", len(s), 2*len(dst))
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return fmt.Errorf("%q is not lowercase hex", s)
		}
	}
	_, err := hex.Decode(dst, []byte(s))
	return err
}
