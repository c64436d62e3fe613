package registry

import (
	"encoding/json"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
)

var (
	testInstance = strings.Repeat("0123456789abcdef", 2)
	testFP       = strings.Repeat("ab", 32)
)

func goodRecord() string {
	return `{"v":1,"addresses":["127.0.0.1:7701","[::1]:7701"],"instance":"` + testInstance + `","fingerprint":"` + testFP + `"}`
}

func TestRecordRoundTrip(t *testing.T) {
	n, err := ParseRecord("node-a", []byte(goodRecord()))
	if err != nil {
		t.Fatal(err)
	}
	if n.Name != "node-a" || len(n.Addresses) != 2 || n.Addresses[1] != "[::1]:7701" ||
		n.Fingerprint.String() != testFP || n.Instance[0] != 0x01 {
		t.Fatalf("parsed %+v", n)
	}
	b, err := EncodeRecord(n)
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseRecord("node-a", b)
	if err != nil || back.Fingerprint != n.Fingerprint || back.Instance != n.Instance || strings.Join(back.Addresses, ",") != strings.Join(n.Addresses, ",") {
		t.Fatalf("round trip: %+v, %v", back, err)
	}
	// The largest record this package writes fits the bound readers keep.
	var big Node
	big.Name = strings.Repeat("n", cert.MaxNameLen)
	big.Instance[0] = 1
	for i := range config.MaxAdvertise {
		big.Addresses = append(big.Addresses, "["+strings.Repeat("ffff:", 7)+"ffff%"+strconv.Itoa(i)+"]:65535")
	}
	// Zone names make the addresses as long as net.SplitHostPort allows.
	if b, err := EncodeRecord(big); err != nil || len(b) > MaxRecordSize {
		t.Fatalf("largest record: %d bytes, %v", len(b), err)
	}
}

// TestRecordRefused: each way a record in the registry can be wrong is
// refused, with an error that says what was wrong.
func TestRecordRefused(t *testing.T) {
	good := goodRecord()
	repl := func(old, new string) string { return strings.Replace(good, old, new, 1) }
	for _, tc := range []struct {
		name, key, data, want string
	}{
		{"garbage", "node-a", "\x00\xffnot json", "not a JSON object"},
		{"empty", "node-a", "", "not a JSON object"},
		{"null", "node-a", "null", "not a JSON object"},
		{"array", "node-a", "[1]", "not a JSON object"},
		{"huge", "node-a", repl(`"v":1`, `"v":1`+strings.Repeat(" ", MaxRecordSize)), "more than 1024"},
		{"trailing", "node-a", good + "{}", "data after the object"},
		{"truncated", "node-a", good[:len(good)-1], "unexpected EOF"},
		{"unknown field", "node-a", repl(`"v":1`, `"v":1,"cert":"x"`), `unknown field "cert"`},
		{"field in other case", "node-a", repl(`"addresses"`, `"Addresses"`), `unknown field "Addresses"`},
		{"field twice", "node-a", repl(`"v":1`, `"v":1,"v":1`), `field "v" twice`},
		{"missing field", "node-a", repl(`"v":1,`, ""), `no field "v"`},
		{"name in the record", "node-a", repl(`"v":1`, `"v":1,"name":"node-b"`), `unknown field "name"`},
		{"version 2", "node-a", repl(`"v":1`, `"v":2`), "record version 2, want 1"},
		{"version a string", "node-a", repl(`"v":1`, `"v":"1"`), "cannot unmarshal string"},
		{"no addresses", "node-a", repl(`["127.0.0.1:7701","[::1]:7701"]`, `[]`), "0 addresses"},
		{"addresses null", "node-a", repl(`["127.0.0.1:7701","[::1]:7701"]`, `null`), "0 addresses"},
		{"too many addresses", "node-a", repl(`"127.0.0.1:7701",`, strings.Repeat(`"h:1",`, 8)), "9 addresses"},
		{"address without port", "node-a", repl(`127.0.0.1:7701`, `127.0.0.1`), `address 0: "127.0.0.1" is not host:port`},
		{"address unspecified", "node-a", repl(`127.0.0.1:7701`, `0.0.0.0:7701`), "unspecified address"},
		{"address port 0", "node-a", repl(`[::1]:7701`, `[::1]:0`), "address 1"},
		{"address a number", "node-a", repl(`"127.0.0.1:7701"`, `7701`), "cannot unmarshal number"},
		{"instance short", "node-a", repl(testInstance, "0123"), "record instance: 4 characters"},
		{"instance upper case", "node-a", repl(testInstance, strings.ToUpper(testInstance)), "not lowercase hex"},
		{"instance zero", "node-a", repl(testInstance, strings.Repeat("0", 32)), "instance is zero"},
		{"fingerprint short", "node-a", repl(testFP, "abab"), "record fingerprint: 4 characters"},
		{"fingerprint not hex", "node-a", repl(testFP, strings.Repeat("zz", 32)), "not lowercase hex"},
		{"key not a name", "node/a", good, "key: name"},
		{"key empty", "", good, "key: empty name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := ParseRecord(tc.key, []byte(tc.data))
			if err == nil {
				t.Fatalf("accepted: %+v", n)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

func FuzzParseRecord(f *testing.F) {
	f.Add([]byte(goodRecord()))
	f.Add([]byte(`{"v":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		n, err := ParseRecord("node-a", data)
		if err != nil {
			return
		}
		// What parses is a record this package would write.
		b, err := EncodeRecord(n)
		if err != nil {
			t.Fatalf("parsed %+v, which does not encode: %v", n, err)
		}
		var m map[string]any
		if json.Unmarshal(b, &m) != nil || len(m) != 4 {
			t.Fatalf("encoded %s", b)
		}
	})
}

// TestNodeMemory: a known node costs at most 1 KiB parsed (issue 14's
// target), measured as the heap a view of many nodes takes.
func TestNodeMemory(t *testing.T) {
	const n = 5000
	data := []byte(`{"v":1,"addresses":["10.1.2.3:7701"],"instance":"` + testInstance + `","fingerprint":"` + testFP + `"}`)
	v := newView()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range n {
		node, err := ParseRecord("node-"+strconv.Itoa(100000+i), data)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.put(node); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := (int64(after.HeapAlloc) - int64(before.HeapAlloc)) / n
	t.Logf("%d bytes per known node (%d nodes)", per, v.len())
	if per > 1024 {
		t.Errorf("%d bytes per known node, more than 1 KiB", per)
	}
	runtime.KeepAlive(v)
}
