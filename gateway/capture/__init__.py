"""Packets in: the live sniffer (AF_PACKET + kernel BPF), pcap replay, and the frame parser they share; captures
read into per-device observation windows for identification and training (``windows``)."""
