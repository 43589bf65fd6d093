using MoeLora.Torch.Text;
using MoeLora.Torch.Training;

namespace MoeLora.Torch.Tests.Text;

/// <summary>The tokenizer.json reader on hand-made tokenizers (ids worked out by hand from the merges) and the tiny preset's.</summary>
public class HfTokenizerTests
{
    /// <summary>
    /// Hand-made byte-level BPE (Data/tokenizers/byte_level_bpe.json): GPT-2 byte symbols (Ġ = space, Ċ = newline,
    /// "é" = bytes C3 A9 = "Ã©"), ten merges in rank order, BOS by TemplateProcessing; ids below 128 so the hf-tiny
    /// models can run its output.
    /// </summary>
    public static string ByteLevelBpe => File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "Data", "tokenizers", "byte_level_bpe.json"));

    [Fact]
    public void ByteLevelBpeEncodesByMergeRankAndRoundTrips()
    {
        var tok = new HfTokenizer(ByteLevelBpe);
        // "hello" → hello; " the" → Ġthe ("h e" merges before "Ġ t"); " world" → Ġwor l d ("o r" before "Ġ w"); "!".
        Assert.Equal([100, 15, 17, 20, 2, 7, 11], tok.Encode("hello the world!"));
        Assert.Equal([15, 17, 20, 2, 7, 11], tok.Encode("hello the world!", addSpecialTokens: false));
        Assert.Equal("hello the world!", tok.Decode(tok.Encode("hello the world!"), skipSpecialTokens: true));
        Assert.Equal("<|begin_of_text|>hello the world!", tok.Decode(tok.Encode("hello the world!")));
        Assert.Equal(102, tok.VocabSize);
        Assert.Equal("<|begin_of_text|>", tok.BosToken);
    }

    [Fact]
    public void ByteLevelBpeKeepsSpecialTokensWholeAndMultiByteCharactersRoundTrip()
    {
        var tok = new HfTokenizer(ByteLevelBpe);
        // The added token is matched before pre-tokenisation; "é" is two byte symbols merged into "Ã©"; "\n" is Ċ.
        var ids = tok.Encode("<|eot_id|>héllo\n");
        Assert.Equal([100, 101, 0, 21, 13, 3, 22], ids);
        Assert.Equal("<|begin_of_text|><|eot_id|>héllo\n", tok.Decode(ids));
        Assert.Equal("héllo\n", tok.Decode(ids, skipSpecialTokens: true));
        Assert.Equal(101, tok.TokenId("<|eot_id|>"));
        Assert.Throws<InvalidDataException>(() => tok.Encode("xyz")); // no byte symbols for x, y, z and no unk token
    }

    // SentencePiece-style BPE (Mistral): Prepend ▁ + Replace " " → ▁ normalizers, no pre-tokenizer, byte fallback.
    const string SentencePieceBpe = """
        {
          "added_tokens": [{"id": 0, "content": "<unk>", "special": true}, {"id": 1, "content": "<s>", "special": true}, {"id": 2, "content": "</s>", "special": true}],
          "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
          "pre_tokenizer": null,
          "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
          "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
          "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true, "fuse_unk": true,
            "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0xC3>": 3, "<0xA9>": 4, "▁": 5, "h": 6, "i": 7, "▁h": 8, "▁hi": 9,
                      "t": 10, "e": 11, "r": 12, "▁t": 13, "he": 14, "▁the": 15, "▁there": 16, "re": 17},
            "merges": ["▁ h", "▁h i", "h e", "▁ t", "▁t he", "r e", "▁the re"]}
        }
        """;

    [Fact]
    public void SentencePieceBpeUsesByteFallbackAndRoundTrips()
    {
        var tok = new HfTokenizer(SentencePieceBpe);
        var ids = tok.Encode("hi there é");
        Assert.Equal([1, 9, 16, 5, 3, 4], ids); // "é" is not in the vocabulary: its UTF-8 bytes <0xC3> <0xA9>
        Assert.Equal("hi there é", tok.Decode(ids, skipSpecialTokens: true));
        Assert.Equal(2, tok.PadId); // </s>
    }

    [Fact]
    public void TinyPresetTokenizerRoundTripsChatText()
    {
        var tok = CbModels.Tokenizer(null);
        var text = ChatTemplate.Get("llama3").Request("Ünïcode — and ascii? 123") + "réponse";
        var ids = tok.Encode(text);
        Assert.Equal(tok.TokenId("<|begin_of_text|>"), ids[0]);
        Assert.Contains(tok.TokenId("<|start_header_id|>"), ids);
        Assert.Equal(text, tok.Decode(ids, skipSpecialTokens: false)[("<|begin_of_text|>".Length)..]);
    }

    [Fact]
    public void MissingTokenizerSaysToPassTokenIds()
    {
        var ex = Assert.Throws<FileNotFoundException>(() => HfTokenizer.Load(Path.GetTempPath()));
        Assert.Contains("input_ids", ex.Message);
        Assert.Throws<NotSupportedException>(() => new HfTokenizer("""{"model": {"type": "WordPiece", "vocab": {}}}"""));
    }
}
