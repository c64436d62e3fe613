package x25519

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRFC7748Vectors: the two X25519 vectors of RFC 7748 §5.2 and the
// Diffie-Hellman example of §6.1.
func TestRFC7748Vectors(t *testing.T) {
	for i, v := range []struct{ scalar, u, out string }{
		{"a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
			"e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
			"c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"},
		{"4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
			"e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
			"95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"},
	} {
		out := make([]byte, Size)
		if err := ScalarMult(out, unhex(t, v.scalar), unhex(t, v.u)); err != nil {
			t.Fatalf("vector %d: %v", i, err)
		}
		if !bytes.Equal(out, unhex(t, v.out)) {
			t.Errorf("vector %d: got %x, want %s", i, out, v.out)
		}
	}

	alice := unhex(t, "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	bob := unhex(t, "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
	alicePub, bobPub := make([]byte, Size), make([]byte, Size)
	PublicKey(alicePub, alice)
	PublicKey(bobPub, bob)
	if want := "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"; hex.EncodeToString(alicePub) != want {
		t.Errorf("Alice's public key %x, want %s", alicePub, want)
	}
	if want := "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"; hex.EncodeToString(bobPub) != want {
		t.Errorf("Bob's public key %x, want %s", bobPub, want)
	}
	k1, k2 := make([]byte, Size), make([]byte, Size)
	ScalarMult(k1, alice, bobPub)
	ScalarMult(k2, bob, alicePub)
	if want := "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"; hex.EncodeToString(k1) != want || !bytes.Equal(k1, k2) {
		t.Errorf("shared secret %x and %x, want %s", k1, k2, want)
	}
}

// TestRFC7748Iterated: RFC 7748 §5.2's iteration, k and u starting at 9,
// after one and after 1,000 steps.
func TestRFC7748Iterated(t *testing.T) {
	k, u := make([]byte, Size), make([]byte, Size)
	k[0], u[0] = 9, 9
	out := make([]byte, Size)
	for i := 1; i <= 1000; i++ {
		if err := ScalarMult(out, k, u); err != nil {
			t.Fatal(err)
		}
		copy(u, k)
		copy(k, out)
		switch i {
		case 1:
			if want := "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"; hex.EncodeToString(k) != want {
				t.Fatalf("after 1 iteration: %x, want %s", k, want)
			}
		case 1000:
			if want := "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"; hex.EncodeToString(k) != want {
				t.Fatalf("after 1,000 iterations: %x, want %s", k, want)
			}
		}
	}
}

// reference computes X25519 with crypto/ecdh.
func reference(scalar, point []byte) ([]byte, error) {
	priv, err := ecdh.X25519().NewPrivateKey(scalar)
	if err != nil {
		return nil, err
	}
	pub, err := ecdh.X25519().NewPublicKey(point)
	if err != nil {
		return nil, err
	}
	return priv.ECDH(pub)
}

// check compares ScalarMult with crypto/ecdh on one input, and checks that
// the scalar was read, not written.
func check(t *testing.T, scalar, point []byte) {
	t.Helper()
	want, werr := reference(scalar, point)
	orig := bytes.Clone(scalar)
	got := make([]byte, Size)
	err := ScalarMult(got, scalar, point)
	if !bytes.Equal(scalar, orig) {
		t.Fatalf("ScalarMult changed the scalar")
	}
	if (err != nil) != (werr != nil) {
		t.Fatalf("scalar %x point %x: error %v, crypto/ecdh's %v", scalar, point, err, werr)
	}
	if err != nil {
		if !errors.Is(err, ErrLowOrder) {
			t.Fatalf("error %v is not ErrLowOrder", err)
		}
		return
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("scalar %x point %x: got %x, crypto/ecdh %x", scalar, point, got, want)
	}
}

// TestAgainstECDH compares with crypto/ecdh on random scalars and points,
// points with the top bit set and points at or past p (non-canonical,
// taken modulo p), and public keys.
func TestAgainstECDH(t *testing.T) {
	for n := range 300 {
		s, p := make([]byte, Size), make([]byte, Size)
		rand.Read(s)
		rand.Read(p)
		check(t, s, p)
		p[31] |= 0x80
		check(t, s, p)
		if n < 5 {
			// p + i for i in 0..18: 2^255 - 19 .. 2^255 - 1, and the
			// same with the top bit set.
			for i := range 19 {
				q := bytes.Repeat([]byte{0xff}, Size)
				q[0] = byte(0xed + i)
				q[31] = 0x7f
				check(t, s, q)
				q[31] = 0xff
				check(t, s, q)
			}
		}
		pub, ref := make([]byte, Size), ecdh.X25519()
		if err := PublicKey(pub, s); err != nil {
			t.Fatal(err)
		}
		k, _ := ref.NewPrivateKey(s)
		if !bytes.Equal(pub, k.PublicKey().Bytes()) {
			t.Fatalf("public key of %x: %x, crypto/ecdh %x", s, pub, k.PublicKey().Bytes())
		}
	}
}

// TestLowOrderPoints: points of small order give zero, refused like
// crypto/ecdh refuses them.
func TestLowOrderPoints(t *testing.T) {
	s := make([]byte, Size)
	rand.Read(s)
	for _, p := range []string{
		"0000000000000000000000000000000000000000000000000000000000000000",
		"0100000000000000000000000000000000000000000000000000000000000000",
		"e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
		"5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
		"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
	} {
		check(t, s, unhex(t, p))
		if err := ScalarMult(make([]byte, Size), s, unhex(t, p)); !errors.Is(err, ErrLowOrder) {
			t.Errorf("point %s: %v, want ErrLowOrder", p, err)
		}
	}
}

func TestBadLengths(t *testing.T) {
	k := make([]byte, Size)
	for _, c := range [][3]int{{31, 32, 32}, {32, 33, 32}, {32, 32, 0}} {
		if err := ScalarMult(make([]byte, c[0]), k[:0:0], make([]byte, c[2])); err == nil {
			t.Errorf("lengths %v accepted", c)
		}
		if err := ScalarMult(make([]byte, c[0]), make([]byte, c[1]), make([]byte, c[2])); err == nil {
			t.Errorf("lengths %v accepted", c)
		}
	}
}

// FuzzAgainstECDH: any scalar and point give what crypto/ecdh gives.
func FuzzAgainstECDH(f *testing.F) {
	f.Add(bytes.Repeat([]byte{1}, 64))
	f.Add(append(bytes.Repeat([]byte{0xff}, 32), bytes.Repeat([]byte{0xff}, 32)...))
	f.Add(make([]byte, 64))
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) != 2*Size {
			return
		}
		check(t, in[:Size], in[Size:])
	})
}

func BenchmarkScalarMult(b *testing.B) {
	s, p, out := make([]byte, Size), make([]byte, Size), make([]byte, Size)
	rand.Read(s)
	rand.Read(p)
	for b.Loop() {
		ScalarMult(out, s, p)
	}
}

func BenchmarkECDH(b *testing.B) {
	s, p := make([]byte, Size), make([]byte, Size)
	rand.Read(s)
	rand.Read(p)
	for b.Loop() {
		reference(s, p)
	}
}
