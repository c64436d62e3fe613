// Package x25519 is the X25519 function of RFC 7748 written for a key that
// must not be copied: the scalar is read in place, one bit at a time, from
// the caller's slice (which can be protected memory, package secret), and
// every working value is zeroed before the call returns. The standard
// library's crypto/ecdh (and golang.org/x/crypto/curve25519, built on it)
// copies the scalar into a heap-allocated private key on every call, a copy
// nobody zeroes; that is what this package exists to avoid.
//
// The arithmetic is the Montgomery ladder of RFC 7748 §5 over the field of
// p = 2^255 - 19 (field.go), in constant time: the ladder's steps do not
// depend on the scalar's bits except through a masked swap, and no branch
// or memory index depends on secret data. Its tests check it against the
// RFC's vectors and against crypto/ecdh on random inputs.
//
// What it cannot promise: single bits of the scalar pass through registers
// and the stack while the ladder runs, and a goroutine stack that grows
// mid-call is copied by the Go runtime, leaving the old (unzeroed) stack
// behind with whatever ladder state it held. Neither holds the scalar as a
// whole.
package x25519

import (
	"crypto/subtle"
	"errors"
	"fmt"
)

// Size is the length of scalars, points and results.
const Size = 32

// ErrLowOrder is returned for a point whose product is zero: a point of
// small order, as an attacker would send to force a known shared secret.
var ErrLowOrder = errors.New("x25519: the result is zero (a low-order point)")

// basepoint is u = 9.
var basepoint = [Size]byte{9}

// ScalarMult sets dst to X25519(scalar, point) (RFC 7748 §5): the scalar
// is clamped as it is read, never copied. It refuses a result of zero
// (ErrLowOrder), as RFC 7748 §6.1 allows and crypto/ecdh does.
func ScalarMult(dst, scalar, point []byte) error {
	if len(dst) != Size || len(scalar) != Size || len(point) != Size {
		return fmt.Errorf("x25519: dst, scalar and point must be %d bytes, not %d, %d and %d",
			Size, len(dst), len(scalar), len(point))
	}
	ladder(dst, scalar, point)
	var zero [Size]byte
	if subtle.ConstantTimeCompare(dst, zero[:]) == 1 {
		return ErrLowOrder
	}
	return nil
}

// PublicKey sets dst to the public key of the private key scalar: X25519
// of the scalar and the base point 9.
func PublicKey(dst, scalar []byte) error {
	return ScalarMult(dst, scalar, basepoint[:])
}

// bit returns bit t of the clamped scalar k (RFC 7748 §5
// decodeScalar25519: bits 0, 1, 2 and 255 cleared, bit 254 set), read from
// k where it lies. The branches depend on t, never on k.
func bit(k []byte, t int) uint64 {
	switch {
	case t == 254:
		return 1
	case t < 3 || t > 254:
		return 0
	}
	return uint64(k[t>>3]>>(t&7)) & 1
}

// ladderState is everything the ladder computes, in one place so that one
// call wipes it.
type ladderState struct {
	x1, x2, z2, x3, z3            element
	a, aa, b, bb, e, c, d, da, cb element
	kt, swap                      uint64
}

// ladder writes the u-coordinate of k·u into out (RFC 7748 §5).
func ladder(out, k, u []byte) {
	var s ladderState
	s.x1.setBytes(u)
	s.x2 = feOne
	s.z2 = feZero
	s.x3 = s.x1
	s.z3 = feOne
	for t := 254; t >= 0; t-- {
		s.kt = bit(k, t)
		s.swap ^= s.kt
		s.x2.swap(&s.x3, s.swap)
		s.z2.swap(&s.z3, s.swap)
		s.swap = s.kt

		s.a.add(&s.x2, &s.z2)
		s.aa.square(&s.a)
		s.b.sub(&s.x2, &s.z2)
		s.bb.square(&s.b)
		s.e.sub(&s.aa, &s.bb)
		s.c.add(&s.x3, &s.z3)
		s.d.sub(&s.x3, &s.z3)
		s.da.mul(&s.d, &s.a)
		s.cb.mul(&s.c, &s.b)

		s.x3.add(&s.da, &s.cb)
		s.x3.square(&s.x3)
		s.z3.sub(&s.da, &s.cb)
		s.z3.square(&s.z3)
		s.z3.mul(&s.z3, &s.x1)
		s.x2.mul(&s.aa, &s.bb)
		s.z2.mul(&s.e, &feA24)
		s.z2.add(&s.z2, &s.aa)
		s.z2.mul(&s.z2, &s.e)
	}
	s.x2.swap(&s.x3, s.swap)
	s.z2.swap(&s.z3, s.swap)
	s.z2.invert(&s.z2)
	s.x2.mul(&s.x2, &s.z2)
	s.x2.putBytes(out)
	wipeLadder(&s)
}

// wipeLadder zeroes the ladder's state. It is not inlined, so that the
// compiler cannot drop the stores as dead.
//
//go:noinline
func wipeLadder(s *ladderState) { *s = ladderState{} }
