package registry

import (
	"encoding/json"
	"slices"
	"testing"
)

// FuzzRecordQuickPath: whatever the quick path takes, the strict path
// takes too and reads the same record; ParseRecord's verdict on any data is
// the strict path's.
func FuzzRecordQuickPath(f *testing.F) {
	f.Add([]byte(goodRecord()))
	f.Add([]byte(`{"v":1,"addresses":["127.0.0.1:1"],"instance":"` + testInstance + `","fingerprint":"` + testFP + `"}`))
	f.Add([]byte(`{"v":1,"addresses":["a\u003cb:1"],"instance":"x","fingerprint":"y"}`))
	f.Add([]byte(`{"v":1,"addresses":[],"instance":"x","fingerprint":"y"} `))
	f.Fuzz(func(t *testing.T, data []byte) {
		var quick record
		if quickRecord(data, &quick) {
			if err := checkFields(data); err != nil {
				t.Fatalf("quick path took %q, which the strict path refuses: %v", data, err)
			}
			var strict record
			if err := strictJSON(data, &strict); err != nil {
				t.Fatalf("quick path took %q, which the strict path refuses: %v", data, err)
			}
			if quick.V != strict.V || quick.Instance != strict.Instance || quick.Fingerprint != strict.Fingerprint || !slices.Equal(quick.Addresses, strict.Addresses) {
				t.Fatalf("%q: quick path read %+v, strict path %+v", data, quick, strict)
			}
			b, err := json.Marshal(quick)
			if err != nil || string(b) != string(data) {
				t.Fatalf("quick path took %q, which EncodeRecord would write as %q", data, b)
			}
		}
	})
}

// BenchmarkParseRecord is what every agent pays per record it learns.
func BenchmarkParseRecord(b *testing.B) {
	var n Node
	n.Name = "n0001"
	n.Addresses = []string{"127.1.0.2:40465"}
	n.Instance[0] = 1
	n.Fingerprint[0] = 2
	rec, err := EncodeRecord(n)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseRecord("n0001", rec); err != nil {
			b.Fatal(err)
		}
	}
}
