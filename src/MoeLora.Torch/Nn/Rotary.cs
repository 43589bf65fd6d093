using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Rotary position embeddings as transformers computes them: inverse frequencies in fp32 from
/// <c>rope_parameters</c>, then cos/sin of positions x inv_freq, scaled by the attention factor. longrope and dynamic
/// choose their table per forward from the sequence length (the largest position + 1), as transformers'
/// <c>dynamic_rope_update</c> does; the choice is made on the device, so no layer waits for a host read.
/// </summary>
public sealed class Rotary
{
    /// <summary>The table of a rule that does not depend on the sequence; for longrope and dynamic, the table of a
    /// sequence within the original length.</summary>
    public Tensor InvFreq => _invFreq.Host;
    readonly DeviceTable _invFreq;
    // longrope / dynamic: the table (and, for PhiMoE, the scale) for this forward's positions; null for the others.
    readonly Func<Tensor, (Tensor InvFreq, Tensor? Scale)>? _bySequence;

    /// <summary>The attention factor cos/sin are multiplied by (PhiMoE's per-sequence mscale aside).</summary>
    public double AttentionScaling { get; }

    Rotary(Tensor invFreq, double scaling) : this(new DeviceTable(invFreq), scaling, null) { }

    Rotary(DeviceTable invFreq, double scaling, Func<Tensor, (Tensor, Tensor?)>? bySequence)
    {
        _invFreq = invFreq;
        AttentionScaling = scaling;
        _bySequence = bySequence;
    }

    public static Rotary FromSettings(RopeSettings rope)
    {
        double theta = rope.Theta;
        long dim = rope.Dim;
        return rope.Type switch
        {
            "default" => new Rotary(DefaultInvFreq(theta, dim), 1.0),
            "yarn" => Yarn(rope, theta, dim),
            "llama3" => new Rotary(Llama3InvFreq(rope, theta, dim), 1.0),
            // linear: positions divided by the factor, i.e. inv_freq / factor.
            "linear" => new Rotary(DefaultInvFreq(theta, dim) / (rope.Factor ?? throw new InvalidDataException("linear rope needs 'factor'.")), 1.0),
            "longrope" => LongRope(rope, theta, dim),
            "dynamic" => DynamicNtk(rope, theta, dim),
            _ => throw new NotSupportedException($"rope_type '{rope.Type}' is not supported (supported: default, linear, llama3, yarn, longrope, dynamic)."),
        };
    }

    // 1 / base^(arange(0, dim, 2)/dim), in fp32 like torch: int64 arange cast to float, then pow.
    static Tensor DefaultInvFreq(double theta, long dim) =>
        1.0 / pow(theta, arange(0, dim, 2, ScalarType.Int64).to(ScalarType.Float32) / dim);

    /// <summary>
    /// Llama 3.1's scaling (transformers <c>_compute_llama3_parameters</c>), in fp32: wavelengths longer than
    /// original/low_freq_factor are divided by the factor, shorter than original/high_freq_factor kept, and the band
    /// between interpolated smoothly.
    /// </summary>
    static Tensor Llama3InvFreq(RopeSettings rope, double theta, long dim)
    {
        double factor = rope.Factor ?? throw new InvalidDataException("llama3 rope needs 'factor'.");
        double low = rope.LowFreqFactor ?? throw new InvalidDataException("llama3 rope needs 'low_freq_factor'.");
        double high = rope.HighFreqFactor ?? throw new InvalidDataException("llama3 rope needs 'high_freq_factor'.");
        double old = rope.OriginalMaxPositionEmbeddings ?? throw new InvalidDataException("llama3 rope needs 'original_max_position_embeddings'.");
        var inv = DefaultInvFreq(theta, dim);
        double lowWavelen = old / low, highWavelen = old / high;
        var wavelen = 2 * Math.PI / inv;
        var scaled = where(wavelen > lowWavelen, inv / factor, inv);
        var smooth = (old / wavelen - low) / (high - low);
        var smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
        var medium = (wavelen < highWavelen).logical_not().logical_and((wavelen > lowWavelen).logical_not());
        return where(medium, smoothed, scaled);
    }

    static Rotary Yarn(RopeSettings rope, double theta, long dim)
    {
        double factor = rope.Factor ?? throw new InvalidDataException("yarn rope needs 'factor'.");
        long original = rope.OriginalMaxPositionEmbeddings ?? throw new InvalidDataException("yarn rope needs 'original_max_position_embeddings'.");
        static double MScale(double scale, double m = 1) => scale <= 1 ? 1.0 : 0.1 * m * Math.Log(scale) + 1.0;
        double attention = rope.AttentionFactor
            ?? (rope.MScale is { } ms && ms != 0 && rope.MScaleAllDim is { } mad && mad != 0 ? MScale(factor, ms) / MScale(factor, mad) : MScale(factor));
        double betaFast = rope.BetaFast ?? 32, betaSlow = rope.BetaSlow ?? 1;
        double CorrectionDim(double rotations) => dim * Math.Log(original / (rotations * 2 * Math.PI)) / (2 * Math.Log(theta));
        double low = CorrectionDim(betaFast), high = CorrectionDim(betaSlow);
        if (rope.Truncate) { low = Math.Floor(low); high = Math.Ceiling(high); }
        low = Math.Max(low, 0); high = Math.Min(high, dim - 1);
        if (low == high) high += 0.001;
        var ramp = ((arange(dim / 2, ScalarType.Float32) - low) / (high - low)).clamp(0, 1);
        var posFreqs = pow(theta, arange(0, dim, 2, ScalarType.Int64).to(ScalarType.Float32) / dim);
        var extrapolation = 1.0 / posFreqs;
        var interpolation = 1.0 / (factor * posFreqs);
        var extraFactor = 1 - ramp;
        var inv = interpolation * (1 - extraFactor) + extrapolation * extraFactor;
        return new Rotary(inv, attention);
    }

    /// <summary>
    /// longrope (transformers <c>_compute_longrope_parameters</c>): inv_freq = 1 / (ext · base^(2i/dim)), with ext the
    /// <c>short_factor</c> list while the sequence fits <c>original_max_position_embeddings</c> and <c>long_factor</c>
    /// past it; attention factor √(1 + ln f / ln original), f = <c>factor</c> or max/original positions. PhiMoE's
    /// rotary (<see cref="RopeSettings.PhimoeRotary"/>) keeps the short factors at every length, as transformers 5.17's
    /// PhimoeRotaryEmbedding computes them (its forward calls the init without a sequence length), and scales by
    /// <c>short_mscale</c> / <c>long_mscale</c> by length instead, where given.
    /// </summary>
    static Rotary LongRope(RopeSettings rope, double theta, long dim)
    {
        var shortFactor = rope.ShortFactor ?? throw new InvalidDataException("longrope needs 'short_factor'.");
        var longFactor = rope.LongFactor ?? throw new InvalidDataException("longrope needs 'long_factor'.");
        if (shortFactor.Count != dim / 2 || longFactor.Count != dim / 2)
            throw new InvalidDataException($"longrope needs {dim / 2} 'short_factor' and 'long_factor' values (one per rotated pair of dims), got {shortFactor.Count} and {longFactor.Count}.");
        long original = rope.OriginalMaxPositionEmbeddings ?? rope.MaxPositionEmbeddings
            ?? throw new InvalidDataException("longrope needs 'original_max_position_embeddings' or 'max_position_embeddings'.");
        double factor = rope.Factor ?? (rope.MaxPositionEmbeddings ?? original) / (double)original;
        double attention = rope.AttentionFactor ?? (factor <= 1 ? 1.0 : Math.Sqrt(1 + Math.Log(factor) / Math.Log(original)));
        DeviceTable Table(IReadOnlyList<double> ext) =>
            new(1.0 / (tensor(ext.Select(x => (float)x).ToArray()) * pow(theta, arange(0, dim, 2, ScalarType.Int64).to(ScalarType.Float32) / dim)));
        var shortInv = Table(shortFactor);
        // PhiMoE's rotary never uses the long table (see above).
        var longInv = rope.PhimoeRotary ? null : Table(longFactor);
        double shortScale = attention, longScale = attention;
        if (rope.PhimoeRotary)
        {
            shortScale = rope.ShortMScale ?? attention;
            longScale = rope.LongMScale ?? attention;
        }
        return new Rotary(shortInv, attention, positions =>
        {
            var device = positions.device;
            var isLong = SequenceLength(positions).gt(original);
            var inv = longInv is null ? shortInv.On(device) : where(isLong, longInv.On(device), shortInv.On(device));
            // Filled on the device (a tensor made from a host value would be copied, and that copy waits).
            Tensor? scale = shortScale == longScale ? null
                : full([], shortScale, ScalarType.Float32, device).masked_fill(isLong, longScale);
            return (inv, scale);
        });
    }

    /// <summary>
    /// Dynamic NTK (transformers <c>_compute_dynamic_ntk_parameters</c> under <c>dynamic_rope_update</c>): past
    /// <c>max_position_embeddings</c> (M) the base becomes base·(f·L/M − (f − 1))^(dim/(dim−2)) for the longest
    /// sequence L seen so far; the table stays while later sequences are shorter but still past M, and returns to the
    /// default one for a sequence under M. That state lives on the device (transformers keeps it in the module too).
    /// </summary>
    static Rotary DynamicNtk(RopeSettings rope, double theta, long dim)
    {
        double factor = rope.Factor ?? throw new InvalidDataException("dynamic rope needs 'factor'.");
        long max = rope.MaxPositionEmbeddings ?? throw new InvalidDataException("dynamic rope needs 'max_position_embeddings'.");
        var defaultInv = new DeviceTable(DefaultInvFreq(theta, dim));
        var exponents = new DeviceTable(arange(0, dim, 2, ScalarType.Int64).to(ScalarType.Float32) / dim);
        Tensor? cached = null; // the longest sequence the current table was made for (transformers' max_seq_len_cached)
        return new Rotary(defaultInv, 1.0, positions =>
        {
            var device = positions.device;
            var seq = SequenceLength(positions);
            var known = cached?.to(device) ?? full([], max, ScalarType.Int64, device);
            var grown = where(seq.gt(known), seq, known);
            var next = grown.masked_fill(seq.lt(max).logical_and(grown.gt(max)), max);
            cached?.Dispose();
            cached = next.DetachFromDisposeScope();
            // As transformers computes it from a tensor length: every step in fp32.
            var scaledBase = next.to(ScalarType.Float32).mul(factor).div(max).sub(factor - 1).pow(dim / (double)(dim - 2)).mul(theta);
            var inv = 1.0 / scaledBase.pow(exponents.On(device));
            return (where(next.gt(max), inv, defaultInv.On(device)), null);
        });
    }

    // transformers' seq_len for the rope update: torch.max(position_ids) + 1, a 0-d tensor on the device.
    static Tensor SequenceLength(Tensor positions) => positions.max().to(ScalarType.Int64).add(1);

    (Tensor InvFreq, Tensor? Scale) Table(Tensor positions) =>
        _bySequence is null ? (_invFreq.On(positions.device), null) : _bySequence(positions);

    /// <summary>
    /// A constant table kept on the host with one copy per device it is used on. Moving it on every call would copy
    /// it from the host each time, and a host-to-device copy waits for the device: a stall in every attention layer.
    /// </summary>
    sealed class DeviceTable(Tensor host)
    {
        readonly Dictionary<string, Tensor> _copies = [];
        public Tensor Host { get; } = host.DetachFromDisposeScope();

        public Tensor On(Device device)
        {
            if (device.type == DeviceType.CPU) return Host;
            lock (_copies)
            {
                var key = device.ToString();
                if (!_copies.TryGetValue(key, out var copy)) _copies[key] = copy = Host.to(device).DetachFromDisposeScope();
                return copy;
            }
        }
    }

    /// <summary>Angles [B, S, dim/2] for integer positions [B, S] (fp32).</summary>
    public Tensor Freqs(Tensor positions) => Angles(positions, Table(positions).InvFreq);

    static Tensor Angles(Tensor positions, Tensor invFreq) =>
        positions.to(ScalarType.Float32).unsqueeze(-1) * invFreq.view(1, 1, -1);

    /// <summary>(cos, sin) of cat(freqs, freqs) [B, S, dim], scaled, in <paramref name="dtype"/>.</summary>
    public (Tensor Cos, Tensor Sin) CosSin(Tensor positions, ScalarType dtype, bool duplicate = true)
    {
        var (invFreq, scale) = Table(positions);
        var f = Angles(positions, invFreq);
        var emb = duplicate ? cat([f, f], -1) : f;
        if (scale is not null) return ((emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype));
        return ((emb.cos() * AttentionScaling).to(dtype), (emb.sin() * AttentionScaling).to(dtype));
    }

    /// <summary>
    /// The half rotation's tables for this forward's positions, made once per forward and shared by every layer that
    /// uses this rotary in <paramref name="dtype"/> (transformers too computes cos/sin once, in the model's
    /// <c>rotary_emb</c>, and hands them to every layer; dynamic rope's state then also advances once per forward).
    /// </summary>
    public HalfRotation Half(ForwardContext ctx, ScalarType dtype) => ctx.HalfRotation(this, dtype, () =>
    {
        var (cos, sin) = CosSin(ctx.Positions, dtype);
        return HalfRotation.From(cos, sin);
    });

    static Tensor RotateHalf(Tensor x)
    {
        var halves = x.chunk(2, -1);
        return cat([-halves[1], halves[0]], -1);
    }

    /// <summary>Llama-style: x*cos + rotate_half(x)*sin; x is [B, heads, S, d], cos/sin [B, S, d].</summary>
    public static Tensor ApplyHalf(Tensor x, Tensor cos, Tensor sin) =>
        x * cos.unsqueeze(1) + RotateHalf(x) * sin.unsqueeze(1);

    /// <summary>
    /// GLM-style rotation of adjacent pairs (ERNIE 4.5): cos/sin [B, S, dim] (fp32, duplicated halves) are reduced to
    /// their first half and repeated per pair; <c>x·cos + rot(x)·sin</c> in fp32 with rot(x)[2i] = -x[2i+1],
    /// rot(x)[2i+1] = x[2i]; cast back to x's dtype. x is [B, heads, S, d].
    /// </summary>
    public static Tensor ApplyInterleavedPairs(Tensor x, Tensor cos, Tensor sin)
    {
        long half = cos.shape[^1] / 2;
        var c = cos[.., .., ..(int)half].repeat_interleave(2, -1).unsqueeze(1);
        var s = sin[.., .., ..(int)half].repeat_interleave(2, -1).unsqueeze(1);
        var even = x[.., .., .., TensorIndex.Slice(0, null, 2)];
        var odd = x[.., .., .., TensorIndex.Slice(1, null, 2)];
        var rot = stack([-odd, even], -1).flatten(-2);
        return (x.to(ScalarType.Float32) * c + rot.to(ScalarType.Float32) * s).to(x.dtype);
    }

    /// <summary>DeepSeek rope_interleave: de-interleave pairs (view d/2,2 → transpose) before the llama rotation.</summary>
    public static Tensor ApplyInterleaved(Tensor x, Tensor cos, Tensor sin)
    {
        var s = x.shape;
        var y = x.view(s[0], s[1], s[2], s[3] / 2, 2).transpose(4, 3).reshape(s[0], s[1], s[2], s[3]);
        return ApplyHalf(y, cos, sin);
    }

    /// <summary>
    /// Llama4's complex rotation of adjacent pairs (x[2i], x[2i+1]) by angle f_i, in fp32 then cast back;
    /// x is [B, S, heads, d] (before the transpose to heads-first), freqs [B, S, d/2].
    /// </summary>
    public static Tensor ApplyComplexPairs(Tensor x, Tensor freqs, double scaling)
    {
        var s = x.shape;
        var xf = x.to(ScalarType.Float32).reshape(s[0], s[1], s[2], s[3] / 2, 2);
        var a = xf[.., .., .., .., 0];
        var b = xf[.., .., .., .., 1];
        var c = (freqs.cos() * scaling).unsqueeze(2);
        var si = (freqs.sin() * scaling).unsqueeze(2);
        var re = a * c - b * si;
        var im = a * si + b * c;
        return stack([re, im], -1).flatten(3).to(x.dtype);
    }
}

/// <summary>
/// Llama-style rotation <c>x·cos + rotate_half(x)·sin</c> with tables made once per forward: cos as [B, 1, S, d] and
/// sin with its first half negated, so that <c>rotate_half(x)·sin = roll(x, d/2)·signed_sin</c> (rotate_half is
/// cat(−x₂, x₁), roll is cat(x₂, x₁), and (−a)·b = a·(−b) exactly): a roll and a product per call where rotate_half takes
/// a negation, a concatenation and a product. Bit for bit <see cref="Rotary.ApplyHalf"/>. A head wider than the tables
/// (partial rotary: GLM-4.5, CCA) has its first dims rotated and the rest passed through, as apply_rotary_pos_emb does.
/// </summary>
public sealed record HalfRotation(Tensor Cos, Tensor SignedSin)
{
    /// <param name="cos">[B, S, d]</param><param name="sin">[B, S, d]</param>
    public static HalfRotation From(Tensor cos, Tensor sin)
    {
        long half = sin.shape[^1] / 2;
        var signed = cat([-sin.narrow(-1, 0, half), sin.narrow(-1, half, half)], -1);
        return new HalfRotation(cos.unsqueeze(1), signed.unsqueeze(1));
    }

    /// <summary>x [B, heads, S, d] rotated (its first dims only, where d is wider than the tables).</summary>
    public Tensor Apply(Tensor x)
    {
        long rot = Cos.shape[^1], d = x.shape[^1];
        if (rot == d) return x * Cos + x.roll(rot / 2, -1) * SignedSin;
        var parts = x.split([rot, d - rot], -1);
        return cat([Apply(parts[0]), parts[1]], -1);
    }

    public IEnumerable<Tensor> Tensors => [Cos, SignedSin];
}
