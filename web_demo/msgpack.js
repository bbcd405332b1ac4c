// Minimal msgpack codec for the demo: nil, bool, int, float64, str, bin, array, map (spec subset used by protocol v1).
"use strict";
const MsgPack = (() => {
  const te = new TextEncoder(), td = new TextDecoder();

  function encode(value) {
    const out = [];
    const u8 = (...b) => out.push(...b);
    const be = (n, bytes) => { for (let i = bytes - 1; i >= 0; i--) out.push((n / 2 ** (8 * i)) & 0xff); };
    const walk = (v) => {
      if (v === null || v === undefined) u8(0xc0);
      else if (v === false) u8(0xc2);
      else if (v === true) u8(0xc3);
      else if (typeof v === "number") {
        if (Number.isInteger(v) && v >= 0 && v < 2 ** 32) {
          if (v < 128) u8(v); else if (v < 256) u8(0xcc, v); else if (v < 65536) { u8(0xcd); be(v, 2); } else { u8(0xce); be(v, 4); }
        } else if (Number.isInteger(v) && v < 0 && v >= -(2 ** 31)) {
          if (v >= -32) u8(v & 0xff); else { u8(0xd2); be(v >>> 0, 4); }
        } else {
          const b = new DataView(new ArrayBuffer(8)); b.setFloat64(0, v); u8(0xcb, ...new Uint8Array(b.buffer));
        }
      } else if (typeof v === "string") {
        const b = te.encode(v);
        if (b.length < 32) u8(0xa0 | b.length); else if (b.length < 256) u8(0xd9, b.length);
        else if (b.length < 65536) { u8(0xda); be(b.length, 2); } else { u8(0xdb); be(b.length, 4); }
        for (const x of b) out.push(x);
      } else if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
        const b = v instanceof Uint8Array ? v : new Uint8Array(v);
        if (b.length < 256) u8(0xc4, b.length); else if (b.length < 65536) { u8(0xc5); be(b.length, 2); } else { u8(0xc6); be(b.length, 4); }
        for (const x of b) out.push(x);
      } else if (Array.isArray(v)) {
        if (v.length < 16) u8(0x90 | v.length); else { u8(0xdc); be(v.length, 2); }
        v.forEach(walk);
      } else {
        const keys = Object.keys(v).filter((k) => v[k] !== undefined);
        if (keys.length < 16) u8(0x80 | keys.length); else { u8(0xde); be(keys.length, 2); }
        for (const k of keys) { walk(k); walk(v[k]); }
      }
    };
    walk(value);
    return new Uint8Array(out);
  }

  function decode(buffer) {
    const b = new Uint8Array(buffer), dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
    let p = 0;
    const str = (n) => { const s = td.decode(b.subarray(p, p + n)); p += n; return s; };
    const bin = (n) => { const s = b.slice(p, p + n); p += n; return s; };
    const arr = (n) => { const a = []; for (let i = 0; i < n; i++) a.push(read()); return a; };
    const map = (n) => { const o = {}; for (let i = 0; i < n; i++) { const k = read(); o[k] = read(); } return o; };
    const u = (n) => { let v = 0; for (let i = 0; i < n; i++) v = v * 256 + b[p++]; return v; };
    function read() {
      const t = b[p++];
      if (t < 0x80) return t;
      if (t >= 0xe0) return t - 256;
      if ((t & 0xf0) === 0x80) return map(t & 0x0f);
      if ((t & 0xf0) === 0x90) return arr(t & 0x0f);
      if ((t & 0xe0) === 0xa0) return str(t & 0x1f);
      switch (t) {
        case 0xc0: return null; case 0xc2: return false; case 0xc3: return true;
        case 0xc4: return bin(u(1)); case 0xc5: return bin(u(2)); case 0xc6: return bin(u(4));
        case 0xca: { const v = dv.getFloat32(p); p += 4; return v; }
        case 0xcb: { const v = dv.getFloat64(p); p += 8; return v; }
        case 0xcc: return u(1); case 0xcd: return u(2); case 0xce: return u(4); case 0xcf: return u(8);
        case 0xd0: { const v = dv.getInt8(p); p += 1; return v; }
        case 0xd1: { const v = dv.getInt16(p); p += 2; return v; }
        case 0xd2: { const v = dv.getInt32(p); p += 4; return v; }
        case 0xd9: return str(u(1)); case 0xda: return str(u(2)); case 0xdb: return str(u(4));
        case 0xdc: return arr(u(2)); case 0xdd: return arr(u(4));
        case 0xde: return map(u(2)); case 0xdf: return map(u(4));
      }
      throw new Error("msgpack: unsupported type 0x" + t.toString(16));
    }
    return read();
  }
  return { encode, decode };
})();
