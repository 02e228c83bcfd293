// containerd-apply: the containerd-parity oracle of the tests.
//
// "apply ROOT [overlay|naive]" unpacks the tar on stdin into ROOT with containerd's own
// archive.Apply (containerd 1.6, Debian's golang-github-containerd-containerd-dev), the code
// that containerd's overlay snapshotter runs when it pulls a layer; "overlay" converts
// whiteouts like the overlay snapshotter does (archive.OverlayConvertWhiteout).
//
// "write-unclosed" writes a small archive to stdout with Go's tar.Writer and never closes it:
// the stream ends right after the last file's data (no padding, no end blocks), as layers
// written by tools that forget Close() do.
//
// "list" prints one JSON line per entry as Go's archive/tar reader sees it, with a map of the
// data (runs of 4 KiB blocks that are not all zeros, and the sha256 of their bytes); for a
// sparse member, the holes Go's reader parsed (read from its state with reflect) and the sha256
// of the stored data instead, so that a 60 GB sparse member costs what it stores.
//
// Built in GOPATH mode by the tests (GO111MODULE=off GOPATH=/usr/share/gocode).
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"reflect"
	"strings"
	"time"
	"unsafe"

	"github.com/containerd/containerd/archive"
)

const block = 4096

type run struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

type entry struct {
	Name     string            `json:"name"`
	Typeflag string            `json:"typeflag"`
	Size     int64             `json:"size"`
	Mode     int64             `json:"mode"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	MtimeNs  int64             `json:"mtime_ns"`
	Linkname string            `json:"linkname"`
	Devmajor int64             `json:"devmajor"`
	Devminor int64             `json:"devminor"`
	Xattrs   map[string]string `json:"xattrs"`
	Data     []run             `json:"data"`
	DataHash string            `json:"data_sha256"`
	Holes    []run             `json:"holes,omitempty"`
	Stored   string            `json:"stored_sha256,omitempty"`
}

// sparseState returns the holes and the stored-data reader of the current entry when Go's
// reader expands a sparse member (tar.Reader.curr is a *sparseFileReader), else nil.
func sparseState(tr *tar.Reader) ([]run, io.Reader) {
	curr := reflect.ValueOf(tr).Elem().FieldByName("curr").Elem()
	if curr.Kind() != reflect.Ptr || curr.Elem().Type().Name() != "sparseFileReader" {
		return nil, nil
	}
	state := curr.Elem()
	sp := state.FieldByName("sp")
	holes := make([]run, sp.Len())
	for i := range holes {
		holes[i] = run{sp.Index(i).Field(0).Int(), sp.Index(i).Field(1).Int()}
	}
	fr := state.FieldByName("fr")
	stored := reflect.NewAt(fr.Type(), unsafe.Pointer(fr.UnsafeAddr())).Elem().Interface()
	return holes, stored.(io.Reader)
}

// dataMap reads the entry's logical bytes: runs of non-zero 4 KiB blocks and their hash.
func dataMap(r io.Reader) ([]run, string, error) {
	buf := make([]byte, 1<<20)
	zero := make([]byte, block)
	hash := sha256.New()
	var runs []run
	var offset int64
	for {
		n, err := io.ReadFull(r, buf)
		for at := 0; at < n; at += block {
			end := at + block
			if end > n {
				end = n
			}
			piece := buf[at:end]
			if bytes.Equal(piece, zero[:len(piece)]) {
				continue
			}
			hash.Write(piece)
			start := offset + int64(at)
			if k := len(runs) - 1; k >= 0 && runs[k].Offset+runs[k].Length == start {
				runs[k].Length += int64(len(piece))
			} else {
				runs = append(runs, run{start, int64(len(piece))})
			}
		}
		offset += int64(n)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return runs, hex.EncodeToString(hash.Sum(nil)), nil
		}
		if err != nil {
			return nil, "", err
		}
	}
}

func list() error {
	tr := tar.NewReader(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		e := entry{Name: hdr.Name, Typeflag: string([]byte{hdr.Typeflag}), Size: hdr.Size,
			Mode: hdr.Mode, UID: hdr.Uid, GID: hdr.Gid, MtimeNs: hdr.ModTime.UnixNano(),
			Linkname: hdr.Linkname, Devmajor: hdr.Devmajor, Devminor: hdr.Devminor,
			Xattrs: map[string]string{}}
		for k, v := range hdr.PAXRecords {
			if len(k) > 13 && k[:13] == "SCHILY.xattr." {
				e.Xattrs[k[13:]] = hex.EncodeToString([]byte(v))
			}
		}
		if holes, stored := sparseState(tr); holes != nil {
			hash := sha256.New()
			if _, err := io.Copy(hash, stored); err != nil {
				return fmt.Errorf("%s: %w", hdr.Name, err)
			}
			e.Holes, e.Stored = holes, hex.EncodeToString(hash.Sum(nil))
		} else if e.Data, e.DataHash, err = dataMap(tr); err != nil {
			return fmt.Errorf("%s: %w", hdr.Name, err)
		}
		if err := out.Encode(e); err != nil {
			return err
		}
	}
}

func writeUnclosed() error {
	tw := tar.NewWriter(os.Stdout)
	when := time.Unix(1600000000, 123456789)
	long := strings.Repeat("long-name/", 12) + "file"
	entries := []struct {
		hdr  tar.Header
		data string
	}{
		{tar.Header{Typeflag: tar.TypeDir, Name: "dir/", Mode: 0o750, ModTime: when}, ""},
		{tar.Header{Typeflag: tar.TypeReg, Name: "dir/file", Mode: 0o644, Uid: 1000,
			Gid: 1000, ModTime: when, Format: tar.FormatPAX}, "hello\n"},
		{tar.Header{Typeflag: tar.TypeLink, Name: "dir/link", Linkname: "dir/file",
			ModTime: when}, ""},
		{tar.Header{Typeflag: tar.TypeSymlink, Name: "sym", Linkname: "dir/file", Mode: 0o777,
			ModTime: when}, ""},
		{tar.Header{Typeflag: tar.TypeReg, Name: long, Mode: 0o600, Uid: 3000000,
			ModTime: when, PAXRecords: map[string]string{"SCHILY.xattr.user.go": "x"}}, "deep\n"},
		{tar.Header{Typeflag: tar.TypeReg, Name: "last", Mode: 0o644, ModTime: when},
			"the last file, unpadded\n"},
	}
	for _, e := range entries {
		e.hdr.Size = int64(len(e.data))
		if err := tw.WriteHeader(&e.hdr); err != nil {
			return err
		}
		if _, err := io.WriteString(tw, e.data); err != nil {
			return err
		}
	}
	return nil // no tw.Close(): that is the point
}

func main() {
	var err error
	switch {
	case len(os.Args) >= 3 && os.Args[1] == "apply":
		var opts []archive.ApplyOpt
		if len(os.Args) < 4 || os.Args[3] == "overlay" {
			opts = append(opts, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout))
		}
		_, err = archive.Apply(context.Background(), os.Args[2], os.Stdin, opts...)
	case len(os.Args) == 2 && os.Args[1] == "write-unclosed":
		err = writeUnclosed()
	case len(os.Args) == 2 && os.Args[1] == "list":
		err = list()
	default:
		fmt.Fprintln(os.Stderr, "usage: containerd-apply apply ROOT [overlay|naive] <TAR"+
			" | list <TAR | write-unclosed >TAR")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
