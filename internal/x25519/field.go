package x25519

import (
	"encoding/binary"
	"math/bits"
)

// element is a number modulo p = 2^255 - 19 in five 51-bit limbs:
//
//	value = l[0] + l[1]·2^51 + l[2]·2^102 + l[3]·2^153 + l[4]·2^204
//
// Every operation leaves each limb below 2^51 + 2^16 ("carried"), which is
// what every operation expects of its inputs: products of carried limbs,
// even times 38, stay far below 2^128, and a carried limb is below the
// limbs of 2p that sub adds before it subtracts. No operation branches on,
// or indexes memory by, the value of an element.
type element [5]uint64

const mask51 = 1<<51 - 1

var (
	feZero = element{}
	feOne  = element{1}
	// a24 is (486662 - 2) / 4, the constant of the ladder's doubling step
	// (RFC 7748 §5).
	feA24 = element{121665}
)

// setBytes sets v to the 32 little-endian bytes of b with the top bit
// ignored (RFC 7748 §5: the u-coordinate's most significant bit is
// masked). A value from p to 2^255 - 1 is taken as it is, and is reduced
// by the arithmetic like any other.
func (v *element) setBytes(b []byte) {
	_ = b[31]
	v[0] = binary.LittleEndian.Uint64(b[0:8]) & mask51
	v[1] = binary.LittleEndian.Uint64(b[6:14]) >> 3 & mask51
	v[2] = binary.LittleEndian.Uint64(b[12:20]) >> 6 & mask51
	v[3] = binary.LittleEndian.Uint64(b[19:27]) >> 1 & mask51
	v[4] = binary.LittleEndian.Uint64(b[24:32]) >> 12 & mask51
}

// putBytes writes v, fully reduced, as 32 little-endian bytes into b.
func (v *element) putBytes(b []byte) {
	_ = b[31]
	t := *v
	t.carry()
	// t < 2p now. q is 1 exactly when t ≥ p, that is when t + 19 carries
	// out of bit 255.
	q := (t[0] + 19) >> 51
	q = (t[1] + q) >> 51
	q = (t[2] + q) >> 51
	q = (t[3] + q) >> 51
	q = (t[4] + q) >> 51
	// t - q·p = t + 19q - q·2^255: add 19q, carry through, drop bit 255.
	t[0] += 19 * q
	t[1] += t[0] >> 51
	t[0] &= mask51
	t[2] += t[1] >> 51
	t[1] &= mask51
	t[3] += t[2] >> 51
	t[2] &= mask51
	t[4] += t[3] >> 51
	t[3] &= mask51
	t[4] &= mask51
	binary.LittleEndian.PutUint64(b[0:8], t[0]|t[1]<<51)
	binary.LittleEndian.PutUint64(b[8:16], t[1]>>13|t[2]<<38)
	binary.LittleEndian.PutUint64(b[16:24], t[2]>>26|t[3]<<25)
	binary.LittleEndian.PutUint64(b[24:32], t[3]>>39|t[4]<<12)
}

// carry brings every limb back below 2^51 + 2^18 (from anything below
// 2^64), folding what leaves the top limb back in times 19
// (2^255 ≡ 19 mod p).
func (v *element) carry() {
	c0, c1, c2, c3, c4 := v[0]>>51, v[1]>>51, v[2]>>51, v[3]>>51, v[4]>>51
	v[0] = v[0]&mask51 + 19*c4
	v[1] = v[1]&mask51 + c0
	v[2] = v[2]&mask51 + c1
	v[3] = v[3]&mask51 + c2
	v[4] = v[4]&mask51 + c3
}

// add sets v = a + b.
func (v *element) add(a, b *element) {
	v[0] = a[0] + b[0]
	v[1] = a[1] + b[1]
	v[2] = a[2] + b[2]
	v[3] = a[3] + b[3]
	v[4] = a[4] + b[4]
	v.carry()
}

// sub sets v = a - b, computed as a + 2p - b so that no limb goes below
// zero (a carried b has every limb below those of 2p).
func (v *element) sub(a, b *element) {
	v[0] = a[0] + (2<<51 - 38) - b[0]
	v[1] = a[1] + (2<<51 - 2) - b[1]
	v[2] = a[2] + (2<<51 - 2) - b[2]
	v[3] = a[3] + (2<<51 - 2) - b[3]
	v[4] = a[4] + (2<<51 - 2) - b[4]
	v.carry()
}

// wide is a 128-bit accumulator.
type wide struct{ lo, hi uint64 }

// mulAdd returns w + a·b.
func mulAdd(w wide, a, b uint64) wide {
	hi, lo := bits.Mul64(a, b)
	lo, c := bits.Add64(lo, w.lo, 0)
	hi, _ = bits.Add64(hi, w.hi, c)
	return wide{lo, hi}
}

// shift51 returns w >> 51, which fits in 64 bits for every sum reduce is
// given (below 2^115).
func (w wide) shift51() uint64 { return w.hi<<13 | w.lo>>51 }

// reduce sets v from the five column sums of a product.
func (v *element) reduce(r0, r1, r2, r3, r4 wide) {
	c0, c1, c2, c3, c4 := r0.shift51(), r1.shift51(), r2.shift51(), r3.shift51(), r4.shift51()
	v[0] = r0.lo&mask51 + 19*c4
	v[1] = r1.lo&mask51 + c0
	v[2] = r2.lo&mask51 + c1
	v[3] = r3.lo&mask51 + c2
	v[4] = r4.lo&mask51 + c3
	v.carry()
}

// mul sets v = a·b. A product's limb i+j of 5 or more wraps to i+j-5
// times 19. v may be a or b.
func (v *element) mul(a, b *element) {
	a0, a1, a2, a3, a4 := a[0], a[1], a[2], a[3], a[4]
	b0, b1, b2, b3, b4 := b[0], b[1], b[2], b[3], b[4]
	b1x19, b2x19, b3x19, b4x19 := 19*b1, 19*b2, 19*b3, 19*b4

	var r0, r1, r2, r3, r4 wide
	r0 = mulAdd(r0, a0, b0)
	r0 = mulAdd(r0, a1, b4x19)
	r0 = mulAdd(r0, a2, b3x19)
	r0 = mulAdd(r0, a3, b2x19)
	r0 = mulAdd(r0, a4, b1x19)

	r1 = mulAdd(r1, a0, b1)
	r1 = mulAdd(r1, a1, b0)
	r1 = mulAdd(r1, a2, b4x19)
	r1 = mulAdd(r1, a3, b3x19)
	r1 = mulAdd(r1, a4, b2x19)

	r2 = mulAdd(r2, a0, b2)
	r2 = mulAdd(r2, a1, b1)
	r2 = mulAdd(r2, a2, b0)
	r2 = mulAdd(r2, a3, b4x19)
	r2 = mulAdd(r2, a4, b3x19)

	r3 = mulAdd(r3, a0, b3)
	r3 = mulAdd(r3, a1, b2)
	r3 = mulAdd(r3, a2, b1)
	r3 = mulAdd(r3, a3, b0)
	r3 = mulAdd(r3, a4, b4x19)

	r4 = mulAdd(r4, a0, b4)
	r4 = mulAdd(r4, a1, b3)
	r4 = mulAdd(r4, a2, b2)
	r4 = mulAdd(r4, a3, b1)
	r4 = mulAdd(r4, a4, b0)

	v.reduce(r0, r1, r2, r3, r4)
}

// square sets v = a², mul with the symmetric terms taken once, doubled.
func (v *element) square(a *element) {
	a0, a1, a2, a3, a4 := a[0], a[1], a[2], a[3], a[4]
	a0x2, a1x2 := 2*a0, 2*a1
	a1x38, a2x38, a3x38 := 38*a1, 38*a2, 38*a3
	a3x19, a4x19 := 19*a3, 19*a4

	var r0, r1, r2, r3, r4 wide
	r0 = mulAdd(r0, a0, a0)
	r0 = mulAdd(r0, a1x38, a4)
	r0 = mulAdd(r0, a2x38, a3)

	r1 = mulAdd(r1, a0x2, a1)
	r1 = mulAdd(r1, a2x38, a4)
	r1 = mulAdd(r1, a3x19, a3)

	r2 = mulAdd(r2, a0x2, a2)
	r2 = mulAdd(r2, a1, a1)
	r2 = mulAdd(r2, a3x38, a4)

	r3 = mulAdd(r3, a0x2, a3)
	r3 = mulAdd(r3, a1x2, a2)
	r3 = mulAdd(r3, a4x19, a4)

	r4 = mulAdd(r4, a0x2, a4)
	r4 = mulAdd(r4, a1x2, a3)
	r4 = mulAdd(r4, a2, a2)

	v.reduce(r0, r1, r2, r3, r4)
}

// squareN sets v = a^(2^n), n ≥ 1.
func (v *element) squareN(a *element, n int) {
	v.square(a)
	for range n - 1 {
		v.square(v)
	}
}

// swap exchanges v and u if c is 1 and leaves both if c is 0, touching
// both the same way either time.
func (v *element) swap(u *element, c uint64) {
	m := -c // all ones or all zeros
	for i := range v {
		t := m & (v[i] ^ u[i])
		v[i] ^= t
		u[i] ^= t
	}
}

// invert sets v = z^(p-2) = 1/z (Fermat; 0 for 0), by a fixed chain of
// 254 squarings and 11 multiplications. v may be z.
func (v *element) invert(z *element) {
	var t inverter
	t.run(v, z)
	wipeInverter(&t)
}

// inverter holds the inversion's temporaries, so that they can be wiped.
type inverter struct{ z2, z9, z11, z5, z10, z20, z50, z100, t element }

func (s *inverter) run(v, z *element) {
	s.z2.square(z)            // z^2
	s.t.squareN(&s.z2, 2)     // z^8
	s.z9.mul(&s.t, z)         // z^9
	s.z11.mul(&s.z2, &s.z9)   // z^11
	s.t.square(&s.z11)        // z^22
	s.z5.mul(&s.t, &s.z9)     // z^31 = z^(2^5 - 1)
	s.t.squareN(&s.z5, 5)     // z^(2^10 - 2^5)
	s.z10.mul(&s.t, &s.z5)    // z^(2^10 - 1)
	s.t.squareN(&s.z10, 10)   //
	s.z20.mul(&s.t, &s.z10)   // z^(2^20 - 1)
	s.t.squareN(&s.z20, 20)   //
	s.t.mul(&s.t, &s.z20)     // z^(2^40 - 1)
	s.t.squareN(&s.t, 10)     //
	s.z50.mul(&s.t, &s.z10)   // z^(2^50 - 1)
	s.t.squareN(&s.z50, 50)   //
	s.z100.mul(&s.t, &s.z50)  // z^(2^100 - 1)
	s.t.squareN(&s.z100, 100) //
	s.t.mul(&s.t, &s.z100)    // z^(2^200 - 1)
	s.t.squareN(&s.t, 50)     //
	s.t.mul(&s.t, &s.z50)     // z^(2^250 - 1)
	s.t.squareN(&s.t, 5)      // z^(2^255 - 2^5)
	v.mul(&s.t, &s.z11)       // z^(2^255 - 21) = z^(p-2)
}

//go:noinline
func wipeInverter(s *inverter) { *s = inverter{} }
